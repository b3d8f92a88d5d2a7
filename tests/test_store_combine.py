"""store.combine: complete stores of disjoint samples (a pool's parts) become one store,
their shards linked, one manifest; bad parts are refused, and a combine redoes itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kdserve as kd
from kdserve.store.combine import combine

X = np.arange(60, dtype=np.float32).reshape(30, 2)


def part(path: Path, ids: range, scale: float = 2.0, name: str = "t") -> Path:
    rows = np.asarray(ids)
    data = [{"x": X[rows[i : i + 4]], "sample_id": rows[i : i + 4]} for i in range(0, len(rows), 4)]
    kd.dump(lambda f: {"y": f["x"] * scale}, data, path, name=name, progress=False, shard_bytes=64)
    return path


def test_parts_become_one_store_with_every_sample(tmp_path: Path) -> None:
    parts = [part(tmp_path / "a", range(0, 30, 2)), part(tmp_path / "b", range(1, 30, 2))]
    assert combine(parts, tmp_path / "all") == 30
    reader = kd.StoreReader(tmp_path / "all")
    assert reader.complete and len(reader.shards) == sum(
        len(kd.StoreReader(p).shards) for p in parts
    )
    got = kd.from_record_batch(reader.read(0, 30))
    np.testing.assert_array_equal(np.sort(got["sample_id"]), np.arange(30))
    np.testing.assert_array_equal(got["y"], X[got["sample_id"]] * 2)
    reader.verify()  # every shard's crc32 still matches
    assert combine(parts, tmp_path / "all") == 30  # done already: returned as is


def test_an_interrupted_combine_is_redone(tmp_path: Path) -> None:
    parts = [part(tmp_path / "a", range(0, 15)), part(tmp_path / "b", range(15, 30))]
    out = tmp_path / "all"
    out.mkdir()
    (out / "shard-00000.arrow").write_bytes(b"half a link")  # left by a crash, no manifest
    assert combine(parts, out) == 30
    kd.StoreReader(out).verify()


def test_bad_parts_are_refused_naming_the_part(tmp_path: Path) -> None:
    a = part(tmp_path / "a", range(0, 15))
    with pytest.raises(kd.AlignmentError, match="sample ids another part holds"):
        combine([a, part(tmp_path / "b", range(10, 20))], tmp_path / "o1")
    with pytest.raises(kd.StoreError, match=r"teacher of name 'other', part .* 't'.* one name"):
        combine([a, part(tmp_path / "c", range(15, 30), name="other")], tmp_path / "o2")
    kd.dump(lambda f: {"z": f["x"]}, [{"x": X[15:]}], tmp_path / "d", name="t", progress=False)
    with pytest.raises(kd.StoreError, match=r"holds \{'z'.*only parts of one dump"):
        combine([a, tmp_path / "d"], tmp_path / "o2")
    with pytest.raises(kd.StoreError, match="no knowledge store"):
        combine([a, tmp_path / "missing"], tmp_path / "o3")
    assert not (tmp_path / "o1" / "manifest.json").exists()


def test_an_incomplete_part_is_refused(tmp_path: Path) -> None:
    a = part(tmp_path / "a", range(0, 15))
    schema = kd.StoreReader(a).schema
    writer = kd.StoreWriter(tmp_path / "b", schema)
    writer.write(kd.to_record_batch({"y": X[15:20] * 2}, schema, np.arange(15, 20)))
    writer.close(complete=False)  # a dump that was stopped
    with pytest.raises(kd.StoreError, match="incomplete: finish"):
        combine([a, tmp_path / "b"], tmp_path / "all")
