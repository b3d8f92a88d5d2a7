"""Language-model knowledge end to end (issue #11): a causal LM's top-k over ragged token
sequences, stored compactly, read back by KnowledgeDataset with decode=False as padded
tensors with masks, and used by topk_kd_loss without densifying."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import kdserve as kd
from _helpers import torch_devices
from kdserve.torch import KnowledgeDataset, kd_loss, teacher_program, topk_kd_loss

VOCAB, K = 40, 5


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 16)
        self.out = nn.Linear(16, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cumsum(self.emb(tokens), dim=1))  # causal: a prefix sum


def corpus() -> list[dict[str, object]]:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, VOCAB, rng.integers(2, 9)) for _ in range(24)]
    return [{"tokens": seqs[i : i + 6], "sample_id": np.arange(i, i + 6)} for i in range(0, 24, 6)]


def test_top_k_sequence_knowledge_reaches_the_loss_compact_and_masked(tmp_path: Path) -> None:
    model = TinyLM()
    keep = kd.Schema(
        [
            kd.Field("tokens", "int64", (None,)),
            kd.Field("logits", "float32", (None, VOCAB), codec=kd.TopK(K)),
        ]
    )
    program = teacher_program(model, inputs=["tokens"], devices=["cpu"])
    kd.dump(program, corpus(), tmp_path / "lm", keep=keep, progress=False)

    dataset = KnowledgeDataset([tmp_path / "lm"], batch_size=8, decode=False)
    batches = list(DataLoader(dataset, batch_size=None))
    assert len(batches) == 3
    first = batches[0]
    lengths = first["tokens_lengths"]
    assert first["logits_values"].shape == (8, int(lengths.max()), K)
    assert first["logits_indices"].shape == (8, int(lengths.max()), K)
    assert first["logits_indices"].dtype == torch.int64  # stored uint16: few ops take that
    assert first["logits_tail"].shape == (8, int(lengths.max()))
    assert torch.equal(first["logits_lengths"], lengths)
    assert torch.equal(first["tokens_mask"], first["logits_mask"])
    assert first["tokens_mask"].sum() == lengths.sum()  # padding is masked, never data

    seqs = [s for b in corpus() for s in b["tokens"]]
    for row in range(8):  # the stored top-k are the model's own top-k at each position
        with torch.inference_mode():
            full = model(torch.as_tensor(seqs[row])[None])[0]
        n = int(lengths[row])
        expected = torch.topk(full, K, dim=-1).indices.sort(-1).values
        got = first["logits_indices"][row, :n].sort(-1).values
        assert torch.equal(got, expected)

    student_logits = torch.zeros(8, int(lengths.max()), VOCAB, requires_grad=True)
    loss = topk_kd_loss(
        student_logits,
        first["logits_values"],
        first["logits_indices"],
        first["logits_tail"],
        mask=first["logits_mask"],
    )
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    pad = ~first["logits_mask"]
    assert torch.all(student_logits.grad[pad] == 0)  # padding positions get no gradient


@pytest.mark.parametrize("device", torch_devices())
def test_top_k_on_the_teachers_device_stores_what_host_coding_stores(
    tmp_path: Path, device: str
) -> None:
    keep = kd.Schema([kd.Field("logits", "float32", (None, VOCAB), codec=kd.TopK(K))])
    dense = teacher_program(TinyLM(), inputs=["tokens"], devices=["cpu"])
    coded = teacher_program(TinyLM(), inputs=["tokens"], devices=[device], topk={"logits": K})
    out = coded({"tokens": corpus()[0]["tokens"]})
    assert set(out["logits"]) == {"values", "indices", "tail"}  # no dense logits to the host
    assert out["logits"]["indices"].dtype == np.uint16
    kd.dump(dense, corpus(), tmp_path / "host", keep=keep, progress=False)
    kd.dump(coded, corpus(), tmp_path / "device", keep=keep, progress=False)
    host = kd.from_record_batch(kd.StoreReader(tmp_path / "host").read(0, 24))
    device = kd.from_record_batch(kd.StoreReader(tmp_path / "device").read(0, 24))
    np.testing.assert_array_equal(host["logits"].lengths, device["logits"].lengths)
    # The same distribution: log-probabilities and logits differ by a constant per position.
    probs = [torch.softmax(torch.from_numpy(d["logits"].values), -1) for d in (host, device)]
    torch.testing.assert_close(probs[1], probs[0], rtol=1e-4, atol=1e-6)
    with np.testing.assert_raises(kd.SchemaError):
        kd.dump(coded, corpus(), tmp_path / "undeclared", progress=False)


class _Peaked(nn.Module):
    """Logits with one token far ahead at every position (a confident teacher): tails
    far below float32's epsilon."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.sin(tokens[..., None].float() * torch.arange(VOCAB)) * 3
        return logits + 28.0 * (torch.arange(VOCAB) == 0)


@pytest.mark.parametrize("device", torch_devices())
def test_top_k_on_the_device_measures_tiny_tails_and_none_at_k_vocab(device: str) -> None:
    tokens = [np.array([3, 7, 1, 2]), np.array([5, 9])]
    for model in (TinyLM(), _Peaked()):
        with torch.inference_mode():
            full = model(torch.as_tensor(tokens[0])[None])[0].double()
        log_p = torch.log_softmax(full, -1)
        for k in (K, VOCAB):
            coded = {"logits": k}
            program = teacher_program(model, inputs=["tokens"], devices=[device], topk=coded)
            parts = program({"tokens": tokens})["logits"]
            tail = torch.from_numpy(parts["tail"][0]).double()
            rest = log_p.scatter(-1, torch.topk(log_p, k, -1).indices, -torch.inf)
            expected = torch.logsumexp(rest, -1).exp()  # float64, over the other entries
            torch.testing.assert_close(tail, expected, rtol=1e-4, atol=0.0)
            if k == VOCAB:  # no entry outside: exactly no tail, and the loss is kd_loss's
                assert not parts["tail"].any()
                student = torch.randn(1, 4, VOCAB)
                got = topk_kd_loss(
                    student,
                    torch.from_numpy(parts["values"][:1]),
                    torch.from_numpy(parts["indices"][:1].astype(np.int64)),
                    torch.from_numpy(parts["tail"][:1]),
                )
                torch.testing.assert_close(got, kd_loss(student, full[None].float()))


def test_an_empty_token_sequence_keeps_the_batch_integer(tmp_path: Path) -> None:
    # np.array([]) (an empty document) is float64: it must not turn the tokens to floats.
    model = TinyLM()
    program = teacher_program(model, inputs=["tokens"], devices=["cpu"])
    data = [{"tokens": [np.array([3, 7, 1]), np.array([]), np.array([5])]}]
    kd.dump(program, data, tmp_path / "s", keep=["logits"], progress=False)
    got = kd.from_record_batch(kd.StoreReader(tmp_path / "s").read(0, 3))["logits"]
    np.testing.assert_array_equal(got.lengths, [3, 0, 1])
    with torch.inference_mode():
        alone = model(torch.tensor([[3, 7, 1]]))[0].numpy()
    np.testing.assert_allclose(got[0], alone, rtol=1e-5, atol=1e-6)


def test_on_policy_query_returns_compact_top_k_for_generated_tokens() -> None:
    """GKD's loop: the student sends sequences it generated (ragged), the teacher answers
    with its top-k for each position, compact (never the dense vocabulary)."""
    model = TinyLM()
    keep = kd.Schema([kd.Field("logits", "float32", (None, VOCAB), codec=kd.TopK(K))])
    program = teacher_program(model, inputs=["tokens"], devices=["cpu"], topk={"logits": K})
    generated = [np.array([3, 7, 1]), np.array([5]), np.array([2, 2, 9, 4, 8])]
    with (
        kd.serve(program, None, feeds=["tokens"], keep=keep, progress=False) as service,
        kd.Student(connect_timeout=10.0) as student,
    ):
        student.add_teacher(service.address)
        compact = student.query(0, {"tokens": generated}, decode=False)
        dense = student.query(0, {"tokens": generated})
    parts = compact["logits"]
    assert set(parts) == {"values", "indices", "tail"}
    np.testing.assert_array_equal(parts["values"].lengths, [3, 1, 5])
    assert parts["values"].values.shape == (9, K)
    assert dense["logits"].values.shape == (9, VOCAB)  # decode=True densifies, as asked
    for row, seq in enumerate(generated):
        with torch.inference_mode():
            log_p = torch.log_softmax(model(torch.as_tensor(seq)[None])[0], -1)
        top = torch.topk(log_p, K, dim=-1)
        np.testing.assert_array_equal(parts["indices"][row], top.indices.numpy())
        np.testing.assert_allclose(parts["values"][row], top.values.numpy(), rtol=1e-6)


def test_token_windows_of_one_length_stay_sequences(tmp_path: Path) -> None:
    """A batch whose token windows happen to be equally long (the usual case when text is
    cut into windows) is still a batch of sequences: its knowledge is stored as such."""
    model = TinyLM()
    keep = kd.Schema([kd.Field("logits", "float32", (None, VOCAB), codec=kd.TopK(K))])
    program = teacher_program(model, inputs=["tokens"], devices=["cpu"], topk={"logits": K})
    rng = np.random.default_rng(1)
    data = [
        {"tokens": [rng.integers(1, VOCAB, 6) for _ in range(4)]},  # all of length 6
        {"tokens": [rng.integers(1, VOCAB, n) for n in (6, 2, 5)]},
    ]
    kd.dump(program, data, tmp_path / "lm", keep=keep, progress=False)
    got = kd.from_record_batch(kd.StoreReader(tmp_path / "lm").read(0, 7), decode=False)
    np.testing.assert_array_equal(got["logits"]["values"].lengths, [6, 6, 6, 6, 6, 2, 5])


def test_an_online_teacher_delivers_compact_top_k_to_knowledge_dataset() -> None:
    """Online, as offline: KnowledgeDataset(decode=False) gets top-k compact, padded per
    batch with masks -- the vocabulary is never expanded on the way."""
    model = TinyLM()
    keep = kd.Schema(
        [
            kd.Field("tokens", "int64", (None,)),
            kd.Field("logits", "float32", (None, VOCAB), codec=kd.TopK(K, values="uint8")),
        ]
    )
    program = teacher_program(model, inputs=["tokens"], devices=["cpu"], topk={"logits": K})
    with kd.serve(program, corpus(), keep=keep, progress=False) as service:
        dataset = KnowledgeDataset([service.address], batch_size=8, decode=False)
        batches = list(DataLoader(dataset, batch_size=None))
    assert sum(len(b["sample_id"]) for b in batches) == 24
    for batch in batches:
        n, longest = batch["tokens"].shape
        assert batch["logits_values"].shape == (n, longest, K)
        assert batch["logits_values"].dtype == torch.float32  # uint8 codes given back as floats
        assert torch.equal(batch["logits_mask"], batch["tokens_mask"])
        loss = topk_kd_loss(
            torch.zeros(n, longest, VOCAB),
            batch["logits_values"],
            batch["logits_indices"],
            batch["logits_tail"],
            mask=batch["logits_mask"],
        )
        assert torch.isfinite(loss)
