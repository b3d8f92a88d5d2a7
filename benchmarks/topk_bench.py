"""Cost of storing language-model knowledge as top-k (issue #11): CPU time per token of a
dump against the teacher alone, bytes stored per token, and the error of what is stored.

The teacher is a language-model head (a ``Linear(hidden, vocab)`` over random hidden
states, in PyTorch on the CPU) giving ``(batch, length, vocab)`` logits for ragged token
sequences. Measured in the same run, on the same batches:

* **teacher alone**: the model over every batch, its logits to numpy, nothing kept;
* **host top-k**: ``kd.dump`` of the dense logits into a ``kd.TopK(k)`` field (the codec
  computes the top-k on the host, from numpy);
* **device top-k**: ``kd.dump`` of ``teacher_program(..., topk={"logits": k})``: top-k,
  log-probabilities and tail computed where the logits are (here the CPU tensor; on a
  GPU, the GPU), only ``k + 1`` numbers per token reach numpy.

CPU time is the process's user + system time (all threads) per token, median of
``--repeats`` runs; bytes/token are the shards' bytes over the tokens. The error is the
mean KL (nats/token) between the exact top-k distribution (the teacher's top-k
probabilities plus a tail bucket, from float64) and the stored one, for fp32 and fp16
values.

    python benchmarks/topk_bench.py            # about a minute on 2 cores
    python benchmarks/topk_bench.py --quick    # smoke test, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from report import fmt, run_table, store_bytes, timed

import kdserve as kd
from kdserve.torch import teacher_program


class Head(torch.nn.Module):
    """An LM head over fixed random hidden states of each token id."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.out = torch.nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(tokens))) * 3


def corpus(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(args.batches):
        lengths = rng.integers(args.length // 2, args.length + 1, args.seqs)
        batches.append({"tokens": [rng.integers(0, args.vocab, n) for n in lengths]})
    return batches


def mean_kl(model: Head, data: list[dict[str, Any]], path: Path, k: int) -> float:
    """Mean KL(exact top-k + tail || stored top-k + tail) per token, in nats."""
    stored = kd.from_record_batch(
        kd.StoreReader(path).read(0, len(kd.StoreReader(path))), decode=False
    )
    parts = stored["logits"]
    total, tokens = 0.0, 0
    row = 0
    for batch in data:
        for seq in batch["tokens"]:
            with torch.inference_mode():
                log_p = torch.log_softmax(model(torch.as_tensor(seq)[None])[0].double(), -1)
            top, _ = torch.topk(log_p, k, dim=-1)
            exact = torch.cat([top.exp(), (1 - top.exp().sum(-1, keepdim=True)).clamp_min(0)], -1)
            vals = torch.from_numpy(parts["values"][row].astype(np.float64))
            tail = torch.from_numpy(parts["tail"][row].astype(np.float64))[:, None]
            got = torch.cat([torch.softmax(vals, -1) * (1 - tail), tail], -1)
            terms = torch.where(exact > 0, exact * (exact.log() - got.clamp_min(1e-300).log()), 0)
            total += float(terms.sum())
            tokens += len(seq)
            row += 1
    return total / tokens


def run(args: argparse.Namespace, workdir: Path) -> list[str]:
    data = corpus(args)
    tokens = sum(len(s) for b in data for s in b["tokens"])
    model = Head(args.vocab, args.hidden).eval()
    dense = teacher_program(model, inputs=["tokens"], devices=["cpu"])

    def alone() -> None:
        for batch in data:
            dense(batch)

    lines = [
        f"{'what':<34} {'CPU us/token':>12} {'x teacher':>10} {'B/token':>8} {'KL nats/token':>14}"
    ]
    base = statistics.median(timed(alone) for _ in range(args.repeats))
    lines.append(f"{'teacher alone':<34} {fmt(base / tokens * 1e6):>12} {'1.00':>10}")
    for k in args.k:
        for dtype in ("float32", "float16"):
            keep = kd.Schema([kd.Field("logits", dtype, (None, args.vocab), codec=kd.TopK(k))])
            coded = teacher_program(model, inputs=["tokens"], devices=["cpu"], topk={"logits": k})
            for label, program in (("host", dense), ("device", coded)):
                path = workdir / f"{label}-{k}-{dtype}"

                def dump(path: Path = path, program: Any = program, keep: Any = keep) -> None:
                    kd.dump(program, data, path, keep=keep, overwrite=True, progress=False)

                cpu = statistics.median(timed(dump) for _ in range(args.repeats))
                size = store_bytes(path) / tokens
                kl = mean_kl(model, data, path, k) if args.kl else float("nan")
                name = f"{label} top-{k}, {dtype} values"
                lines.append(
                    f"{name:<34} {fmt(cpu / tokens * 1e6):>12} {cpu / base:>10.2f} "
                    f"{size:>8.1f} {kl:>14.2e}"
                )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small, 1 repeat: a smoke test")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, default=16, help="batches per dump")
    p.add_argument("--seqs", type=int, default=8, help="sequences per batch")
    p.add_argument("--length", type=int, default=256, help="longest sequence")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--k", type=int, nargs="+", default=[16, 64])
    p.add_argument("--no-kl", dest="kl", action="store_false", help="skip the error column")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.batches, args.seqs, args.length, args.vocab = 1, 2, 2, 32, 256
        args.k = [16]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"kdserve {kd.__version__}, torch {torch.__version__}; {args.batches} batches of "
        f"{args.seqs} sequences of up to {args.length} tokens, vocabulary {args.vocab}, "
        f"{args.repeats} repeat(s)"
    )
    return run_table("kdserve-topk-", lambda workdir: run(args, workdir))


if __name__ == "__main__":
    sys.exit(main())
