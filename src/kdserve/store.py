"""The offline knowledge store: a directory of Arrow IPC shards and a JSON manifest.

    STORE/
      manifest.json        format version, schema, teacher info, shards (rows, ids, bytes, crc32)
      shard-00000.arrow    Arrow IPC *file* format, readable by any Arrow tool
      shard-00001.arrow
      shard-00002.arrow.tmp  (a shard being written; ignored by readers)

Crash safety: a shard is written under a ``.tmp`` name, fsynced and renamed; only then
is it listed in the manifest, which is itself replaced atomically. A writer killed at
any moment leaves a valid store of its complete shards, and reopening the store resumes
after them. Readers memory-map the shards and slice record batches without copying.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kdserve.batch import concat_batches
from kdserve.errors import SchemaError, StoreError
from kdserve.sampler import Block
from kdserve.schema import Schema

__all__ = ["FORMAT_VERSION", "MANIFEST", "ShardInfo", "StoreReader", "StoreWriter"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_FORMAT = "kdserve.store"
_TMP = ".tmp"
DEFAULT_SHARD_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class ShardInfo:
    """One complete shard as the manifest records it."""

    file: str
    bytes: int
    crc32: int
    min_sample_id: int | None
    max_sample_id: int | None
    batch_rows: tuple[int, ...]
    """Rows of each record batch, so a reader locates rows from the manifest alone."""

    @property
    def rows(self) -> int:
        return sum(self.batch_rows)

    def to_json(self) -> dict[str, Any]:
        runs: list[list[int]] = []  # run-length coded: [[rows, how many batches], ...]
        for n in self.batch_rows:
            if runs and runs[-1][0] == n:
                runs[-1][1] += 1
            else:
                runs.append([n, 1])
        return {
            "file": self.file,
            "rows": self.rows,
            "bytes": self.bytes,
            "crc32": f"{self.crc32:08x}",
            "sample_ids": [self.min_sample_id, self.max_sample_id],
            "batches": runs,
        }

    @classmethod
    def from_json(cls, spec: Mapping[str, Any]) -> ShardInfo:
        lo, hi = spec["sample_ids"]
        batch_rows = tuple(int(n) for n, count in spec["batches"] for _ in range(int(count)))
        info = cls(spec["file"], int(spec["bytes"]), int(spec["crc32"], 16), lo, hi, batch_rows)
        if info.rows != int(spec["rows"]):
            raise ValueError(f"'rows' of shard {info.file} ({spec['rows']} != {info.rows})")
        return info


def _fsync(path: Path) -> None:
    """Flush a file or a directory entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + _TMP)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def read_manifest(path: Path) -> dict[str, Any]:
    """The parsed manifest of the store at ``path``, checked for format and version."""
    file = path / MANIFEST
    if not path.is_dir():
        why = "is not a directory" if path.exists() else "does not exist"
        raise StoreError(f"no knowledge store at {path}: the path {why}", path=str(path))
    if not file.is_file():
        raise StoreError(
            f"{path} is not a knowledge store: {MANIFEST} is missing (was the dump run with "
            f"out_path={path}?)",
            path=str(file),
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{file} is unreadable or corrupted: {exc}", path=str(file)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise StoreError(f"{file} is not a kdserve store manifest", path=str(file))
    version = manifest.get("version")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{file} has store format version {version}; this kdserve reads version "
            f"{FORMAT_VERSION}. Upgrade kdserve or re-dump the store",
            path=str(file),
        )
    return manifest


def _parse_manifest(path: Path, manifest: Mapping[str, Any]) -> tuple[Schema, list[ShardInfo]]:
    """The schema and shards a manifest records; StoreError naming it if they are damaged."""
    file = path / MANIFEST
    try:
        schema = Schema.from_json(manifest["schema"])
        shards = [ShardInfo.from_json(s) for s in manifest["shards"]]
    except (KeyError, TypeError, ValueError) as exc:  # SchemaError is a ValueError
        raise StoreError(f"{file} is corrupted: bad or missing {exc}", path=str(file)) from None
    return schema, shards


def stored_rows(path: str | os.PathLike[str]) -> int:
    """Rows a store at ``path`` durably holds (0 if there is no store yet)."""
    if not (Path(path) / MANIFEST).exists():
        return 0
    _, shards = _parse_manifest(Path(path), read_manifest(Path(path)))
    return sum(s.rows for s in shards)


def _crc32_file(path: Path) -> int:
    """crc32 of a file, read in 8 MB chunks (zlib releases the GIL while it hashes)."""
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * 1024 * 1024):
            crc = zlib.crc32(chunk, crc)
    return crc


class StoreWriter:
    """Appends knowledge batches to a store, one bounded shard at a time, crash-safe.

    Opening an existing store resumes it: complete shards are kept, anything half
    written is discarded, and :attr:`rows` says how many rows it already holds. A store
    with another schema is refused unless ``overwrite=True``, which starts it over.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        schema: Schema,
        *,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
        teacher: Mapping[str, Any] | None = None,
    ) -> None:
        if shard_bytes < 1:
            raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
        self.path = Path(path)
        self.schema = schema
        self.shard_bytes = shard_bytes
        self._arrow_schema = schema.to_arrow()
        self._teacher = dict(teacher or {})
        self._shards: list[ShardInfo] = []
        self._created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._open_shard: tuple[pa.NativeFile, pa.ipc.RecordBatchFileWriter, Path] | None = None
        self._batch_rows: list[int] = []  # of the shard in progress
        self._shard_ids: tuple[int, int] | None = None
        self._closed = False
        if (self.path / MANIFEST).exists() and not overwrite:
            self._resume()
        else:
            self._start_over(overwrite)

    @property
    def rows(self) -> int:
        """Rows in complete shards plus rows written to the shard in progress."""
        return sum(s.rows for s in self._shards) + sum(self._batch_rows)

    def _start_over(self, overwrite: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} exists and is not a directory", path=str(self.path))
        self.path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for p in self.path.iterdir():
                if p.name.startswith("shard-") or p.name.startswith(MANIFEST):
                    p.unlink()
        elif any(p.name.startswith("shard-") for p in self.path.iterdir()):
            raise StoreError(
                f"{self.path} holds shard files but no {MANIFEST}; remove them or pass "
                f"overwrite=True to start the store over",
                path=str(self.path),
            )
        self._write_manifest(complete=False)

    def _resume(self) -> None:
        manifest = read_manifest(self.path)
        stored, shards = _parse_manifest(self.path, manifest)
        if stored.fields != self.schema.fields:
            raise StoreError(
                f"the store at {self.path} holds fields {stored.describe()}, not "
                f"{self.schema.describe()}; write to another directory or pass overwrite=True",
                path=str(self.path),
            )
        self._created = manifest.get("created", self._created)
        self._shards = shards
        if manifest.get("teacher") and not self._teacher:
            self._teacher = manifest["teacher"]
        listed = {s.file for s in self._shards}
        for p in self.path.iterdir():  # leftovers of a writer that died mid-shard
            if p.name.startswith("shard-") and p.name not in listed:
                p.unlink()
        for s in self._shards:
            f = self.path / s.file
            if not f.is_file() or f.stat().st_size != s.bytes:
                raise StoreError(
                    f"cannot resume {self.path}: shard {s.file} is missing or truncated; pass "
                    f"overwrite=True to start over",
                    path=str(f),
                )
        self._write_manifest(complete=False)

    def write(self, batch: pa.RecordBatch) -> None:
        """Append a batch (built with :func:`kdserve.to_record_batch` for this schema)."""
        if self._closed:
            raise StoreError(f"the writer of {self.path} is closed", path=str(self.path))
        if not batch.schema.equals(self._arrow_schema):
            raise SchemaError(
                f"batch columns {batch.schema.names} do not match the store's schema "
                f"{self._arrow_schema.names} (types or metadata differ)"
            )
        if batch.num_rows == 0:
            return
        if self._open_shard is None:
            self._open_new_shard()
        assert self._open_shard is not None
        sink, writer, _ = self._open_shard
        writer.write_batch(batch)
        ids = batch.column(0).to_numpy()
        lo, hi = int(ids.min()), int(ids.max())
        if self._shard_ids is not None:
            lo, hi = min(lo, self._shard_ids[0]), max(hi, self._shard_ids[1])
        self._shard_ids = (lo, hi)
        self._batch_rows.append(batch.num_rows)
        if sink.tell() >= self.shard_bytes:
            self._finish_shard()

    def flush(self) -> None:
        """Complete the shard in progress now, making every row written so far durable."""
        if self._open_shard is not None:
            self._finish_shard()

    def close(self) -> None:
        """Complete the last shard and mark the store complete. Idempotent."""
        if self._closed:
            return
        self.flush()
        self._write_manifest(complete=True)
        self._closed = True

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_new_shard(self) -> None:
        name = f"shard-{len(self._shards):05d}.arrow"
        tmp = self.path / (name + _TMP)
        sink = pa.OSFile(str(tmp), "wb")
        writer = pa.ipc.new_file(sink, self._arrow_schema)
        self._open_shard = (sink, writer, tmp)
        self._batch_rows = []
        self._shard_ids = None

    def _finish_shard(self) -> None:
        assert self._open_shard is not None
        sink, writer, tmp = self._open_shard
        writer.close()
        size = sink.tell()
        sink.close()
        # Hash the shard from the page cache while the disk flushes it: the crc costs
        # no time of its own (both calls release the GIL).
        with ThreadPoolExecutor(1, thread_name_prefix="kdserve-crc32") as pool:
            crc = pool.submit(_crc32_file, tmp)
            _fsync(tmp)
            crc32 = crc.result()
        final = tmp.with_name(tmp.name[: -len(_TMP)])
        os.replace(tmp, final)
        _fsync(self.path)
        lo, hi = self._shard_ids if self._shard_ids else (None, None)
        info = ShardInfo(final.name, size, crc32, lo, hi, tuple(self._batch_rows))
        self._shards.append(info)
        self._open_shard = None
        self._batch_rows = []
        self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool) -> None:
        manifest = {
            "format": _FORMAT,
            "version": FORMAT_VERSION,
            "created": self._created,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "complete": complete,
            "rows": sum(s.rows for s in self._shards),
            "teacher": self._teacher,
            "schema": self.schema.to_json(),
            "shards": [s.to_json() for s in self._shards],
        }
        _write_atomic(self.path / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _groups(keys: np.ndarray) -> Iterator[tuple[int, slice]]:
    """``(key, slice)`` of each run of equal values in the sorted ``keys``."""
    bounds = [0, *(np.flatnonzero(np.diff(keys)) + 1).tolist(), len(keys)]
    for lo, hi in itertools.pairwise(bounds):
        yield int(keys[lo]), slice(lo, hi)


@dataclass
class _OpenShard:
    """A shard a reader has opened: its IPC reader, batch start rows, and batches read."""

    reader: pa.ipc.RecordBatchFileReader
    starts: np.ndarray
    batches: list[pa.RecordBatch | None]


class StoreReader:
    """Reads a knowledge store: memory-mapped, zero-copy, any row range without the rest.

    Shard sizes are checked on open; :meth:`verify` also checks every shard's crc32.
    Rows are numbered 0..len-1 in the order they were written.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.schema, self.shards = _parse_manifest(self.path, self.manifest)
        self._arrow_schema = self.schema.to_arrow()
        for s in self.shards:
            f = self.path / s.file
            if not f.is_file():
                raise StoreError(f"shard {f} listed in the manifest is missing", path=str(f))
            size = f.stat().st_size
            if size != s.bytes:
                raise StoreError(
                    f"shard {f} is truncated or altered: {size} bytes on disk, the manifest "
                    f"says {s.bytes}; re-run the dump (it resumes) or restore the file",
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
        return dict(self.manifest.get("teacher") or {})

    @property
    def nbytes(self) -> int:
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
            return pa.RecordBatch.from_pylist([], schema=self._arrow_schema)
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
        return np.concatenate([b.column(0).to_numpy() for b in self.iter_range()])

    def verify(self) -> None:
        """Check every shard's size and crc32 and that it parses; raise StoreError if not."""
        for index, s in enumerate(self.shards):
            f = self.path / s.file
            crc = _crc32_file(f)
            if crc != s.crc32:
                raise StoreError(
                    f"shard {f} is corrupted: crc32 {crc:08x}, the manifest says {s.crc32:08x}; "
                    f"restore the file or re-dump the store",
                    path=str(f),
                )
            starts = self._shard(index).starts
            for b in range(len(starts) - 1):
                self._batch(index, b)
