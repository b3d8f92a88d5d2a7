"""Language-model distillation: a causal LM teacher, trained here on the Python standard
library's own sources with a BPE vocabulary, distilled into a smaller student three ways.

* **offline**: ``kd.dump`` stores the teacher's top-k log-probabilities of every position
  (``kd.TopK(k, values="uint8")``: k bytes of values + 2k of indices per token, zstd on
  top); the student reads the store with ``KnowledgeDataset(decode=False)`` and learns
  with ``topk_kd_loss`` -- the vocabulary is never densified;
* **online**: the same teacher served with ``kd.serve``, recomputed each epoch;
* **on-policy** (GKD): the student writes continuations of prompts, the teacher scores
  them in query mode (``Student.query_stream(decode=False)``), and the student learns its
  teacher's distribution on its own tokens, next to the offline batches.

Every run trains a label-only student on the same batches, from the same initial weights,
and prints the validation perplexity of all of them. Knowledge at position ``i`` is the
teacher's distribution of token ``i + 1`` (what a causal LM's logits at ``i`` predict);
windows never cross a file boundary, so no knowledge crosses a document.

Run: python examples/lm_distillation.py --out /tmp/kd-lm          # CI size, ~80 s
     python examples/lm_distillation.py --full --out /tmp/kd-lm   # vocab 4096, ~25 min
Needs ``pip install tokenizers`` (the ``lm`` extra).
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from torch.utils.data import DataLoader

import kdserve as kd
from kdserve.torch import KnowledgeDataset, teacher_program, topk_kd_loss


@dataclass(frozen=True)
class Settings:
    """One size of the experiment."""

    chars: int  # of standard-library source read
    vocab: int  # BPE vocabulary
    seq: int  # tokens per training window
    teacher: tuple[int, int]  # layers, width
    student: tuple[int, int]
    teacher_steps: int
    epochs: int  # of the students over the training windows
    batch: int
    k: int  # top-k kept per position


SMALL = Settings(300_000, 1024, 64, (4, 128), (2, 64), 300, 2, 32, 16)
FULL = Settings(2_000_000, 4096, 128, (4, 128), (2, 64), 1500, 2, 32, 64)


# -- data -------------------------------------------------------------------------------


def documents(chars: int) -> list[str]:
    """Source files of Python's standard library in a fixed order, each cut to at most
    ``chars / 40`` characters (so about 40 documents or more), ``chars`` in all."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for path in sorted(stdlib.glob("*.py")):
        texts.append(path.read_text(encoding="utf-8", errors="replace")[: chars // 40])
        if sum(map(len, texts)) >= chars:
            break
    return texts


def bpe(texts: list[str], vocab: int) -> Tokenizer:
    """A byte-level BPE vocabulary of ``vocab`` tokens trained on ``texts``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def windows(tokenizer: Tokenizer, texts: list[str], seq: int) -> list[np.ndarray]:
    """Each document cut into windows of ``seq`` tokens (the last one shorter: ragged);
    a window never spans two documents."""
    out = []
    for ids in (e.ids for e in tokenizer.encode_batch(texts)):
        out += [np.array(ids[i : i + seq]) for i in range(0, len(ids) - 1, seq)]
    return [w for w in out if len(w) >= 2]


def batches(data: list[np.ndarray], size: int, shuffle: int | None = None) -> list[dict[str, Any]]:
    """Input batches of ragged token windows, each sample numbered by its window; with
    ``shuffle`` (a pass number), in that pass's random order."""
    order = np.arange(len(data))
    if shuffle is not None:
        order = np.random.default_rng(shuffle).permutation(len(data))
    return [
        {"tokens": [data[j] for j in order[i : i + size]], "sample_id": order[i : i + size]}
        for i in range(0, len(data), size)
    ]


def padded(seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens and their mask (True at real tokens)."""
    tokens = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for row, s in enumerate(seqs):
        tokens[row, : len(s)] = torch.as_tensor(s)
    return tokens, torch.arange(tokens.shape[1]) < torch.tensor([len(s) for s in seqs])[:, None]


# -- the models -------------------------------------------------------------------------


class CausalLM(nn.Module):
    """A small pre-norm transformer language model: tokens (batch, length) -> logits."""

    def __init__(self, vocab: int, layers: int, width: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(
            width, max(1, width // 32), 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        x = self.embed(tokens) + self.position(torch.arange(n, device=tokens.device))
        causal = nn.Transformer.generate_square_subsequent_mask(n, device=tokens.device)
        return self.head(self.norm(self.blocks(x, mask=causal, is_causal=True)))


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each real position's prediction of the next real token."""
    real = mask[:, 1:]
    return nn.functional.cross_entropy(logits[:, :-1][real], tokens[:, 1:][real])


def perplexity(model: nn.Module, data: list[np.ndarray]) -> float:
    """exp(mean next-token cross-entropy) over ``data``."""
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for b in batches(data, 64):
            tokens, mask = padded(b["tokens"])
            n = int(mask[:, 1:].sum())
            total += float(next_token_loss(model(tokens), tokens, mask)) * n
            count += n
    model.train()
    return math.exp(total / count)


def train_teacher(s: Settings, data: list[np.ndarray]) -> CausalLM:
    """The teacher learns from labels, for ``teacher_steps`` random batches."""
    torch.manual_seed(0)
    model = CausalLM(s.vocab, *s.teacher, s.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=s.teacher_steps)
    rng = np.random.default_rng(0)
    for _ in range(s.teacher_steps):
        tokens, mask = padded([data[i] for i in rng.integers(0, len(data), s.batch)])
        opt.zero_grad()
        next_token_loss(model(tokens), tokens, mask).backward()
        opt.step()
        schedule.step()
    return model.eval()


# -- students -------------------------------------------------------------------------


class StudentRun:
    """A student from the shared initial weights, its optimiser and its loss."""

    def __init__(self, s: Settings, steps: int) -> None:
        torch.manual_seed(1)  # every student starts from the same weights
        self.model = CausalLM(s.vocab, *s.student, s.seq)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(self.opt, 3e-3, total_steps=steps)
        self.tokens = 0
        self.updates = 0

    def step(self, batch: dict[str, torch.Tensor], distil: bool) -> None:
        """One update on a KnowledgeDataset batch: next-token loss, plus the top-k KL to
        the teacher at every real position when ``distil``."""
        tokens, mask = batch["tokens"].long(), batch["tokens_mask"]
        logits = self.model(tokens)
        loss = next_token_loss(logits, tokens, mask)
        if distil:
            loss = loss + kd_term(logits, batch, mask)
        self.update(loss)
        self.tokens += int(mask.sum())

    def update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.schedule.step()
        self.updates += 1


def kd_term(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """KL(teacher's top-k + tail || student) at the positions of ``mask``."""
    return topk_kd_loss(
        logits, batch["logits_values"], batch["logits_indices"], batch["logits_tail"], mask=mask
    )


def passes(dataset: KnowledgeDataset, epochs: int) -> Iterator[dict[str, torch.Tensor]]:
    """``epochs`` passes over ``dataset``, batch by batch."""
    loader = DataLoader(dataset, batch_size=None)
    for epoch in range(epochs):
        dataset.set_epoch(epoch)  # a new shuffle; for a served teacher, its next pass
        yield from loader


def train(run: StudentRun, data: Iterable[dict[str, torch.Tensor]], distil: bool) -> float:
    """Train on every batch of ``data``; returns tokens/s."""
    start = time.perf_counter()
    for batch in data:
        run.step(batch, distil)
    return run.tokens / (time.perf_counter() - start)


def generate(model: nn.Module, prompts: torch.Tensor, new: int) -> torch.Tensor:
    """``new`` tokens sampled (T = 1) after each prompt, by ``model``."""
    tokens = prompts
    with torch.no_grad():  # not inference_mode: the tokens are trained on next
        for _ in range(new):
            probs = torch.softmax(model(tokens)[:, -1].float(), -1)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1)], 1)
    return tokens


def on_policy(
    run: StudentRun, data: Iterable[dict[str, torch.Tensor]], teacher: kd.Student, s: Settings
) -> tuple[int, float]:
    """GKD: after each offline batch, the student continues the batch's first tokens and
    learns the teacher's top-k on the positions that predict its own tokens. Returns the
    tokens the teacher scored and their rate (tokens/s of query round trips)."""
    prompt, new = s.seq // 4, s.seq // 4
    scored, waited = 0, 0.0
    for batch in data:
        run.step(batch, distil=True)
        full = batch["tokens_lengths"] >= prompt
        if not full.any():
            continue
        run.model.eval()
        sequences = generate(run.model, batch["tokens"][full, :prompt].long(), new)
        run.model.train()
        start = time.perf_counter()
        knowledge = teacher.query(0, {"tokens": list(sequences.numpy())}, decode=False)
        waited += time.perf_counter() - start
        scored += sequences.numel()
        top = knowledge["logits"]  # Ragged components: every sequence has prompt + new
        compact = {
            f"logits_{part}": torch.from_numpy(np.asarray(top[part].values)).reshape(
                len(sequences), prompt + new, *top[part].values.shape[1:]
            )
            for part in ("values", "indices", "tail")
        }
        mask = torch.zeros(sequences.shape, dtype=torch.bool)
        mask[:, prompt - 1 : -1] = True  # the positions that predicted the student's tokens
        run.update(kd_term(run.model(sequences), compact, mask))
    return scored, scored / waited


# -- the experiment -------------------------------------------------------------------


def main(out: Path, s: Settings) -> None:
    torch.set_num_threads(2)
    began = time.perf_counter()
    texts = documents(s.chars)
    held_out = texts[::10]  # every tenth file: validation text the models never saw
    texts = [t for i, t in enumerate(texts) if i % 10]
    tokenizer = bpe(texts, s.vocab)
    train_data = windows(tokenizer, texts, s.seq)
    valid = windows(tokenizer, held_out, s.seq)
    tokens = sum(map(len, train_data))
    print(
        f"corpus: {len(texts) + len(held_out)} stdlib files, BPE vocabulary {s.vocab}, "
        f"{tokens} training tokens in {len(train_data)} windows, {sum(map(len, valid))} "
        f"validation tokens"
    )

    teacher = train_teacher(s, train_data)
    print(f"({time.perf_counter() - began:.0f} s)")
    results = {"teacher": perplexity(teacher, valid)}
    print(f"teacher {s.teacher[0]} layers x {s.teacher[1]}: perplexity {results['teacher']:.1f}")

    keep = kd.Schema(
        [
            kd.Field("tokens", "int32", (None,)),
            kd.Field("logits", "float32", (None, s.vocab), codec=kd.TopK(s.k, values="uint8")),
        ]
    )
    # Top-k where the logits are (here the CPU; on a GPU, the GPU): only k + 1 numbers per
    # token reach the host. Ragged windows are padded for the model, never stored padded.
    program = teacher_program(teacher, inputs=["tokens"], devices=["cpu"], topk={"logits": s.k})
    store = out / "teacher-topk"
    kd.dump(
        program, batches(train_data, s.batch), store, keep=keep, overwrite=True, compression="zstd"
    )
    stored = sum(f.stat().st_size for f in store.glob("shard-*.arrow"))
    print(
        f"store: top-{s.k} uint8 log-probs + tokens, zstd: {stored / tokens:.1f} B/token "
        f"({stored} bytes)"
    )

    steps = s.epochs * len(batches(train_data, s.batch))
    offline = KnowledgeDataset([store], batch_size=s.batch, decode=False, shuffle=True)
    for name, distil in (("labels only", False), ("offline top-k", True)):
        run = StudentRun(s, steps)
        rate = train(run, passes(offline, s.epochs), distil)
        results[name] = perplexity(run.model, valid)
        print(
            f"student {name:<14} perplexity {results[name]:7.1f}  {run.updates} updates, "
            f"{rate:,.0f} tokens/s"
        )

    def reader(pass_: int) -> list[dict[str, Any]]:  # the teacher shuffles each pass
        return batches(train_data, s.batch, shuffle=pass_)

    with kd.serve(program, reader, times=s.epochs, keep=keep) as service:
        run = StudentRun(s, steps)
        online = KnowledgeDataset([service.address], batch_size=s.batch, decode=False)
        rate = train(run, passes(online, s.epochs), distil=True)
    results["online"] = perplexity(run.model, valid)
    print(
        f"student {'online':<14} perplexity {results['online']:7.1f}  {run.updates} updates, "
        f"{rate:,.0f} tokens/s"
    )

    scorer = kd.Schema([kd.Field("logits", "float32", (None, s.vocab), codec=kd.TopK(s.k))])
    with (
        kd.serve(program, None, feeds=["tokens"], keep=scorer) as service,
        kd.Student(connect_timeout=30.0) as asker,
    ):
        asker.add_teacher(service.address)
        run = StudentRun(s, 2 * steps)
        scored, rate = on_policy(run, passes(offline, s.epochs), asker, s)
    results["on-policy"] = perplexity(run.model, valid)
    print(
        f"student {'on-policy':<14} perplexity {results['on-policy']:7.1f}  {run.updates} "
        f"updates (half on its own text), teacher scored {scored} tokens at {rate:,.0f}/s"
    )

    print(f"({time.perf_counter() - began:.0f} s)")
    # The fair comparison: the same batches, the same number of updates.
    assert results["offline top-k"] < results["labels only"], results
    print(
        f"lm: distilled student perplexity {results['offline top-k']:.1f} (offline top-{s.k}, "
        f"same updates) < label-only {results['labels only']:.1f} (teacher "
        f"{results['teacher']:.1f})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="output directory (default: a temp dir)")
    parser.add_argument("--full", action="store_true", help="the full-size experiment")
    args = parser.parse_args()
    settings = FULL if args.full else SMALL
    if args.out is not None:
        main(args.out, settings)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp), settings)
