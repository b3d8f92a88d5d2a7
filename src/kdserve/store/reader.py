"""The store's reader: memory-mapped shards, zero-copy row ranges, gathered rows, and
crc32 checks of each shard before its first use or all at once."""

from __future__ import annotations

import itertools
import mmap
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kdserve.core.batch import concat_batches, sample_ids
from kdserve.core.sampler import Block
from kdserve.errors import StoreError
from kdserve.store.damage import repair_advice
from kdserve.store.files import crc32_file
from kdserve.store.manifest import parse_manifest, read_manifest

__all__ = ["StoreReader"]


@dataclass
class _OpenShard:
    """A shard a reader has opened: its IPC reader, batch start rows, and batches read."""

    reader: pa.ipc.RecordBatchFileReader
    starts: np.ndarray
    batches: list[pa.RecordBatch | None]


class StoreReader:
    """Reads a knowledge store: memory-mapped, zero-copy, any row range without the rest.

    Shard sizes are checked on open; :meth:`verify` also checks every shard's crc32, and
    ``verify=True`` checks each shard's crc32 once, before its first use (one pass over
    the shard's bytes). Rows are numbered 0..len-1 in the order they were written.
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = False) -> None:
        self.path = Path(path)
        self.verify_shards = verify
        self._checked: set[int] = set()  # shards whose crc32 matched
        self.manifest = read_manifest(self.path)
        self.schema, self.shards = parse_manifest(self.path, self.manifest)
        self._arrow_schema = self.schema.to_arrow()
        for s in self.shards:
            f = self.path / s.file
            if not f.is_file():
                raise StoreError(f"shard {f} listed in the manifest is missing", path=str(f))
            size = f.stat().st_size
            if size != s.bytes:
                raise StoreError(
                    f"shard {f} is truncated or altered: {size} bytes on disk, the manifest "
                    f"says {s.bytes}; {repair_advice(self.path, s.rows)}",
                    path=str(f),
                )
        self._shard_starts = np.cumsum([0] + [s.rows for s in self.shards])
        self._open: dict[int, _OpenShard] = {}

    @property
    def complete(self) -> bool:
        """True when the writer closed the store; False while a dump is running or died."""
        return bool(self.manifest.get("complete"))

    @property
    def teacher(self) -> dict[str, Any]:
        """What the writer recorded of the teacher (name, model)."""
        return dict(self.manifest.get("teacher") or {})

    @property
    def nbytes(self) -> int:
        """Bytes of the store's shards on disk."""
        return sum(s.bytes for s in self.shards)

    def __len__(self) -> int:
        return int(self._shard_starts[-1])

    def __repr__(self) -> str:
        return f"StoreReader({str(self.path)!r}, rows={len(self)}, shards={len(self.shards)})"

    def _shard(self, index: int) -> _OpenShard:
        """Shard ``index``, opened on first use: only its footer is read."""
        if index not in self._open:
            info = self.shards[index]
            f = self.path / info.file
            try:
                with open(f, "rb") as fh:
                    # Python's mmap, not pa.memory_map: Arrow's asks the kernel to read ahead
                    # every batch it touches, which makes one random read pull a whole batch.
                    mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                if self.verify_shards and index not in self._checked:
                    self._check_crc(index, zlib.crc32(mapped))
                reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mapped)))
                if not reader.schema.equals(self._arrow_schema):
                    raise StoreError(
                        f"shard {f} has columns {reader.schema.names}, not the manifest's "
                        f"{self._arrow_schema.names}",
                        path=str(f),
                    )
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise StoreError(f"shard {f} is corrupted: {exc}", path=str(f)) from None
            if reader.num_record_batches != len(info.batch_rows):
                raise StoreError(
                    f"shard {f} holds {reader.num_record_batches} batches, the manifest says "
                    f"{len(info.batch_rows)}",
                    path=str(f),
                )
            starts = np.cumsum([0, *info.batch_rows])
            self._open[index] = _OpenShard(reader, starts, [None] * len(info.batch_rows))
        return self._open[index]

    def _check_crc(self, index: int, crc: int) -> None:
        """StoreError naming shard ``index`` if ``crc`` is not the manifest's crc32."""
        info = self.shards[index]
        if crc != info.crc32:
            f = self.path / info.file
            raise StoreError(
                f"shard {f} is corrupted: crc32 {crc:08x}, the manifest says "
                f"{info.crc32:08x}; {repair_advice(self.path, info.rows)}",
                path=str(f),
            )
        self._checked.add(index)

    def _batch(self, shard: int, index: int) -> pa.RecordBatch:
        """Stored batch ``index`` of ``shard``, checked once and kept (it is only a view)."""
        opened = self._shard(shard)
        batch = opened.batches[index]
        if batch is None:
            f = self.path / self.shards[shard].file
            try:
                batch = opened.reader.get_batch(index)
                batch.validate(full=True)
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise StoreError(
                    f"shard {f}, batch {index} is corrupted: {exc}", path=str(f)
                ) from None
            if batch.num_rows != self.shards[shard].batch_rows[index]:
                raise StoreError(
                    f"shard {f}, batch {index} holds {batch.num_rows} rows, the manifest says "
                    f"{self.shards[shard].batch_rows[index]}",
                    path=str(f),
                )
            opened.batches[index] = batch
        return batch

    def iter_range(self, start: int = 0, stop: int | None = None) -> Iterator[pa.RecordBatch]:
        """Rows ``[start, stop)`` as zero-copy slices of the stored batches, in order."""
        stop = len(self) if stop is None else stop
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"row range [{start}, {stop}) is outside the store's {len(self)} rows")
        row = start
        while row < stop:
            shard = int(np.searchsorted(self._shard_starts, row, side="right")) - 1
            starts = self._shard(shard).starts
            local = row - int(self._shard_starts[shard])
            index = int(np.searchsorted(starts, local, side="right")) - 1
            batch = self._batch(shard, index)
            offset = local - int(starts[index])
            take = min(batch.num_rows - offset, stop - row)
            yield batch.slice(offset, take)
            row += take

    def read(self, start: int, stop: int) -> pa.RecordBatch:
        """Rows ``[start, stop)`` as one batch (zero-copy when they lie in one stored batch)."""
        pieces = list(self.iter_range(start, stop))
        if not pieces:
            empty = [pa.nulls(0, f.type) for f in self._arrow_schema]  # not from_pylist:
            return pa.RecordBatch.from_arrays(empty, schema=self._arrow_schema)  # pandas
        return concat_batches(pieces)

    def take(self, rows: np.ndarray) -> pa.RecordBatch:
        """The given rows, in the given order: gathered from each stored batch they touch."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return self.read(0, 0)
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(
                f"rows {int(rows.min())}..{int(rows.max())} are outside the store's "
                f"{len(self)} rows"
            )
        # Name each row's stored batch by the batch's first row; open only touched shards.
        batch_of = np.empty_like(rows)
        shard_of = np.searchsorted(self._shard_starts, rows, side="right") - 1
        for shard in np.unique(shard_of).tolist():
            mine = shard_of == shard
            first = int(self._shard_starts[shard])
            starts = self._shard(shard).starts
            batch_of[mine] = (
                first + starts[np.searchsorted(starts, rows[mine] - first, "right") - 1]
            )
        order = np.argsort(batch_of, kind="stable")
        pieces = []
        for begin, group in _groups(batch_of[order]):
            picked = rows[order[group]] - begin
            pieces.append(self.read(begin, begin + int(picked.max()) + 1).take(pa.array(picked)))
        gathered = concat_batches(pieces)
        return gathered.take(pa.array(np.argsort(order, kind="stable")))

    def iter_blocks(self, blocks: Iterable[Block]) -> Iterator[pa.RecordBatch]:
        """The rows of ``blocks`` (from :meth:`kdserve.Sampler.plan`), in order."""
        for block in blocks:
            if block.rows is None:
                yield from self.iter_range(block.start, block.stop)
            else:
                yield self.take(block.rows)

    def sample_ids(self) -> np.ndarray:
        """Every row's sample id, in row order."""
        if len(self) == 0:
            return np.zeros(0, np.int64)
        return np.concatenate([sample_ids(b) for b in self.iter_range()])

    def verify(self) -> None:
        """Check every shard's size and crc32 and that it parses; raise StoreError if not."""
        for index, s in enumerate(self.shards):
            if index not in self._checked:
                self._check_crc(index, crc32_file(self.path / s.file))
            starts = self._shard(index).starts
            for b in range(len(starts) - 1):
                self._batch(index, b)


def _groups(keys: np.ndarray) -> Iterator[tuple[int, slice]]:
    """``(key, slice)`` of each run of equal values in the sorted ``keys``."""
    bounds = [0, *(np.flatnonzero(np.diff(keys)) + 1).tolist(), len(keys)]
    for lo, hi in itertools.pairwise(bounds):
        yield int(keys[lo]), slice(lo, hi)
