"""Compressed stores: shards written with Arrow's zstd/lz4 buffer compression read back
the same knowledge, through kdserve and through plain pyarrow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import kdserve as kd
from kdserve.store.writer import StoreWriter

SCHEMA = kd.Schema(
    [
        kd.Field("tokens", "int64", (None,)),
        kd.Field("logits", "float32", (None, 300), codec=kd.TopK(8, values="uint8")),
    ]
)


def batch(seed: int) -> pa.RecordBatch:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 30, 16)
    data = {
        "tokens": [rng.integers(0, 300, n) for n in lengths],
        # A peaked, LM-like distribution: a few tokens take most of the mass.
        "logits": [rng.zipf(1.5, (n, 300)).astype(np.float32) for n in lengths],
    }
    return kd.to_record_batch(data, SCHEMA, np.arange(seed * 16, seed * 16 + 16))


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_a_compressed_store_reads_back_the_same_knowledge(tmp_path: Path, compression: str):
    for name, codec in (("plain", None), ("packed", compression)):
        with StoreWriter(tmp_path / name, SCHEMA, compression=codec) as writer:  # type: ignore[arg-type]
            for seed in range(4):
                writer.write(batch(seed))
    plain, packed = kd.StoreReader(tmp_path / "plain"), kd.StoreReader(tmp_path / "packed")
    assert plain.read(0, 64).equals(packed.read(0, 64))
    shard = next((tmp_path / "packed").glob("shard-*.arrow"))
    with pa.memory_map(str(shard)) as source:  # any Arrow reader opens it
        assert pa.ipc.open_file(source).read_all().num_rows == 64
    size = {
        n: sum(f.stat().st_size for f in (tmp_path / n).glob("shard-*"))
        for n in ("plain", "packed")
    }
    assert size["packed"] < size["plain"]


def test_an_unknown_compression_is_refused_naming_the_choices(tmp_path: Path):
    with pytest.raises(ValueError, match=r"compression must be one of \[None, 'zstd', 'lz4'\]"):
        StoreWriter(tmp_path / "s", SCHEMA, compression="gzip")  # type: ignore[arg-type]
    assert not (tmp_path / "s").exists()  # refused before anything was created


def test_dump_writes_a_compressed_store_a_student_reads(tmp_path: Path):
    rng = np.random.default_rng(0)
    data = [{"x": rng.integers(0, 4, (32, 64)).astype(np.float32)} for _ in range(4)]

    def program(feed):
        return {"y": feed["x"] * 2}

    kd.dump(program, data, tmp_path / "z", compression="zstd", progress=False)
    kd.dump(program, data, tmp_path / "plain", progress=False)
    with kd.Student() as student:
        student.add_store(tmp_path / "z")
        got = np.concatenate([b["y"] for b in student.loader(batch_size=50)])
    np.testing.assert_array_equal(got, np.concatenate([d["x"] * 2 for d in data]))
    size = {
        n: sum(f.stat().st_size for f in (tmp_path / n).glob("shard-*")) for n in ("z", "plain")
    }
    assert size["z"] < size["plain"] / 4  # four distinct values: zstd packs them tightly


def test_dump_refuses_an_unknown_compression_before_running_the_program(tmp_path: Path):
    calls = []
    with pytest.raises(ValueError, match="compression must be one of"):
        kd.dump(
            lambda f: calls.append(1) or f,
            [{"x": np.zeros((2, 2))}],
            tmp_path / "s",
            compression="brotli",
        )  # type: ignore[arg-type]
    assert calls == []
