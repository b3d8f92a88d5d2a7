"""Programs return sequence knowledge the way language models give it (issue #11): padded
``(batch, max_len, vocab)`` with ``<name>_lengths`` or ``<name>_mask`` beside it, a
``kd.Ragged``, or a list; the store holds exactly the real positions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import kdserve as kd

V = 7
RNG = np.random.default_rng(0)
LENGTHS = [[3, 1, 4], [2, 5], [1, 1, 6, 2]]  # per batch: one length per sequence
SEQS = [[RNG.standard_normal((n, V)).astype(np.float32) for n in batch] for batch in LENGTHS]
TOKENS = [[RNG.integers(0, 50, n) for n in batch] for batch in LENGTHS]


def padded(seqs: list[np.ndarray], left: bool = False) -> np.ndarray:
    out = np.full((len(seqs), max(len(s) for s in seqs), V), np.nan, np.float32)  # junk pad
    for i, s in enumerate(seqs):
        if left:
            out[i, out.shape[1] - len(s) :] = s
        else:
            out[i, : len(s)] = s
    return out


def data() -> list[dict[str, Any]]:
    return [{"tokens": batch, "b": np.full(len(batch), i)} for i, batch in enumerate(TOKENS)]


def stored(path: Path) -> list[np.ndarray]:
    reader = kd.StoreReader(path)
    assert reader.schema["logits"].shape == (None, V)
    out = kd.from_record_batch(reader.read(0, len(reader)))
    assert isinstance(out["logits"], kd.Ragged)
    return list(out["logits"])


def expected() -> list[np.ndarray]:
    return [s for batch in SEQS for s in batch]


def check(path: Path) -> None:
    got = stored(path)
    assert len(got) == len(expected())
    for g, e in zip(got, expected(), strict=True):
        np.testing.assert_array_equal(g, e)


def test_padded_with_lengths(tmp_path: Path) -> None:
    def program(feed: dict[str, Any]) -> dict[str, Any]:
        seqs = SEQS[int(feed["b"][0])]
        return {"logits": padded(seqs), "logits_lengths": [len(s) for s in seqs]}

    kd.dump(program, data(), tmp_path / "s", keep=["logits"], progress=False)
    check(tmp_path / "s")


def test_left_padded_with_a_mask_as_torch_tensors(tmp_path: Path) -> None:
    def program(feed: dict[str, Any]) -> dict[str, Any]:
        seqs = SEQS[int(feed["b"][0])]
        pad = padded(seqs, left=True)
        mask = ~np.isnan(pad[..., 0])
        return {"logits": torch.from_numpy(pad), "logits_mask": torch.from_numpy(mask)}

    kd.dump(program, data(), tmp_path / "s", keep=["logits"], progress=False)
    check(tmp_path / "s")


def test_ragged_and_lists(tmp_path: Path) -> None:
    def ragged(feed: dict[str, Any]) -> dict[str, Any]:
        return {"logits": kd.Ragged.from_list(SEQS[int(feed["b"][0])])}

    def listed(feed: dict[str, Any]) -> dict[str, Any]:
        return {"logits": SEQS[int(feed["b"][0])]}

    kd.dump(ragged, data(), tmp_path / "r", keep=["logits"], progress=False)
    kd.dump(listed, data(), tmp_path / "l", keep=["logits"], progress=False)
    check(tmp_path / "r")
    check(tmp_path / "l")


def test_padding_that_changes_length_without_lengths_says_how(tmp_path: Path) -> None:
    def program(feed: dict[str, Any]) -> dict[str, Any]:
        return {"logits": padded(SEQS[int(feed["b"][0])])}

    with pytest.raises(kd.SchemaError, match=r"logits_lengths or logits_mask"):
        kd.dump(program, data(), tmp_path / "s", keep=["logits"], progress=False)


def test_a_mask_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    def program(feed: dict[str, Any]) -> dict[str, Any]:
        seqs = SEQS[int(feed["b"][0])]
        return {"logits": padded(seqs), "logits_mask": np.ones((len(seqs), 1), bool)}

    with pytest.raises(kd.SchemaError, match=r"logits_mask has shape"):
        kd.dump(program, data(), tmp_path / "s", keep=["logits"], progress=False)
