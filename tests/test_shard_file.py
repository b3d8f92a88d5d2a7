"""store.files.ShardFile: a shard's crc32 computed as it is written, its pages flushed in
the background, and the file durable and exact when finished."""

from __future__ import annotations

import gc
import os
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from kdserve.store.files import ShardFile, crc32_file


def test_bytes_crc_and_size_match_the_file_and_flushes_ran_meanwhile(tmp_path: Path) -> None:
    path = tmp_path / "shard.tmp"
    rng = np.random.default_rng(0)
    chunks = [
        rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in rng.integers(1, 400_000, 40)
    ]
    started = []
    shard = ShardFile(path, sync_bytes=1 << 20)
    for chunk in chunks:
        shard.write(memoryview(chunk))
        if shard._syncer is not None and shard._syncer not in started:
            started.append(shard._syncer)
    crc = shard.finish()
    data = b"".join(chunks)
    assert path.read_bytes() == data
    assert crc == zlib.crc32(data) == crc32_file(path)
    assert shard.size == len(data) == shard.tell()
    assert started  # flushed in the background while writing (one at a time)
    assert not any(t.is_alive() for t in started)
    assert shard.closed


def test_an_arrow_ipc_file_written_through_it_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "shard.arrow"
    batch = pa.record_batch({"x": pa.array(np.arange(100_000, dtype=np.float32))})
    shard = ShardFile(path, sync_bytes=64 << 10)
    with pa.ipc.new_file(pa.PythonFile(shard, mode="w"), batch.schema) as writer:
        for _ in range(5):
            writer.write_batch(batch)
    assert shard.finish() == crc32_file(path)
    table = pa.ipc.open_file(str(path)).read_all()
    assert table.num_rows == 500_000 and table.column("x")[99_999].as_py() == 99_999


def test_a_dropped_shard_file_closes_its_descriptor(tmp_path: Path) -> None:
    shard = ShardFile(tmp_path / "dropped.tmp", sync_bytes=1)
    shard.write(b"x" * 10)
    fd, syncer = shard._fd, shard._syncer
    assert syncer is not None
    del shard  # the background flush may still hold it: it is closed when that ends
    syncer.join(10)
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)
