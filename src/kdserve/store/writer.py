"""The store's one writer: appends batches as bounded shards, each made durable before
the manifest lists it, and resumes a store a writer left behind."""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NoReturn

import numpy as np
import pyarrow as pa

from kdserve.core.batch import sample_ids
from kdserve.core.idset import IdSet, repeats
from kdserve.core.schema import Schema
from kdserve.errors import AlignmentError, SchemaError, StoreError
from kdserve.store.files import TMP, ShardFile, fsync
from kdserve.store.lock import StoreLock
from kdserve.store.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SHARD_FILE,
    ShardInfo,
    parse_manifest,
    read_manifest,
    timestamp,
    write_manifest,
)
from kdserve.store.resume import kept_shards, next_shard_index, stored_ids

__all__ = ["COMPRESSIONS", "DEFAULT_SHARD_BYTES", "Compression", "StoreWriter", "ipc_options"]

DEFAULT_SHARD_BYTES = 256 * 1024 * 1024
COMPRESSIONS = (None, "zstd", "lz4")  # Arrow IPC buffer compression; readers undo it
Compression = Literal["zstd", "lz4"] | None


class StoreWriter:
    """Appends knowledge batches to a store, one bounded shard at a time, crash-safe.

    Opening an existing store resumes it: complete shards are kept, anything half
    written is discarded, a damaged last shard is set aside (``*.damaged``, a warning
    names it), and :attr:`rows` says how many rows it already holds. A store with
    another schema is refused unless ``overwrite=True``, which starts it over.

    The writer locks the store until :meth:`close` (another writer gets
    :class:`~kdserve.errors.StoreLockedError`) and stores each sample id once: a batch
    repeating an id gets :class:`~kdserve.errors.AlignmentError` and is not written.

    ``compression="zstd"`` (or ``"lz4"``) compresses each Arrow buffer in the shards:
    smaller stores (top-k indices of a real LM compress well), at the cost of a copy and
    CPU time on every read; any Arrow reader opens them.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        schema: Schema,
        *,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
        teacher: Mapping[str, Any] | None = None,
        compression: Compression = None,
    ) -> None:
        if shard_bytes < 1:
            raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
        self._ipc = ipc_options(compression)
        self.path = Path(path)
        self.schema = schema
        self.shard_bytes = shard_bytes
        self._arrow_schema = schema.to_arrow()
        self._teacher = dict(teacher or {})
        self._shards: list[ShardInfo] = []
        self._created = timestamp()
        self._open_shard: tuple[ShardFile, pa.ipc.RecordBatchFileWriter, Path] | None = None
        self._batch_rows: list[int] = []  # of the shard in progress
        self._shard_ids: tuple[int, int] | None = None
        self._ids = IdSet()  # every sample id in the store, the shard in progress included
        self._next_index = 0  # number of the next shard file
        self._closed = False
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} exists and is not a directory", path=str(self.path))
        self.path.mkdir(parents=True, exist_ok=True)
        lock = StoreLock(self.path)  # before anything in the store is read or changed
        self._unlock = weakref.finalize(self, lock.release)  # also if dropped unclosed
        try:
            if (self.path / MANIFEST).exists() and not overwrite:
                self._resume()
            else:
                self._start_over(overwrite)
        except BaseException:
            self._unlock()
            raise

    @property
    def rows(self) -> int:
        """Rows in complete shards plus rows written to the shard in progress."""
        return sum(s.rows for s in self._shards) + sum(self._batch_rows)

    @property
    def _teacher_name(self) -> str:
        """The name errors give this writer's teacher: its ``teacher["name"]`` or the store's."""
        return str(self._teacher.get("name") or self.path.name)

    def holds(self, ids: np.ndarray) -> np.ndarray:
        """A bool mask of the sample ``ids`` already in the store (to skip them on resume)."""
        return self._ids.contains(np.asarray(ids, dtype=np.int64))

    def _start_over(self, overwrite: bool) -> None:
        """Begin an empty store (``overwrite``: in place of the shards and manifest here)."""
        # Shards set aside as *.damaged are kept (kdserve never deletes them).
        if overwrite:
            for p in self.path.iterdir():
                if SHARD_FILE.fullmatch(p.name) or p.name.startswith(MANIFEST):
                    p.unlink()
        elif any(SHARD_FILE.fullmatch(p.name) for p in self.path.iterdir()):
            raise StoreError(
                f"{self.path} holds shard files but no {MANIFEST}; remove them or pass "
                f"overwrite=True to start the store over",
                path=str(self.path),
            )
        self._next_index = next_shard_index(self.path, [])
        self._write_manifest(complete=False)

    def _resume(self) -> None:
        """Continue the store here after its complete shards, if it holds this schema."""
        manifest = read_manifest(self.path)
        stored, shards = parse_manifest(self.path, manifest)
        if stored.fields != self.schema.fields:
            raise StoreError(
                f"the store at {self.path} holds fields {stored.describe()}, not "
                f"{self.schema.describe()}; write to another directory or pass overwrite=True",
                path=str(self.path),
            )
        self._created = manifest.get("created", self._created)
        recorded = dict(manifest.get("teacher") or {})
        if recorded and not self._teacher:
            self._teacher = recorded
        for key in ("name", "model", "provenance"):  # the teacher whose knowledge it holds
            before, now = recorded.get(key), self._teacher.get(key)
            if before is not None and now is not None and before != now:
                raise StoreError(
                    f"the store at {self.path} holds knowledge of teacher {key} {before!r}, "
                    f"but this dump's is {now!r}; they do not mix: "
                    f"dump to another directory, or pass overwrite=True to start the store over",
                    path=str(self.path),
                )
        self._shards = kept_shards(self.path, shards)
        self._next_index = next_shard_index(self.path, self._shards)
        self._ids = stored_ids(self.path, self._shards)
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
        ids = sample_ids(batch)
        if not self._ids.add_new(ids):
            self._refuse_repeats(ids)
        if self._open_shard is None:
            self._open_new_shard()
        assert self._open_shard is not None
        shard, writer, _ = self._open_shard
        writer.write_batch(batch)
        lo, hi = int(ids.min()), int(ids.max())
        if self._shard_ids is not None:
            lo, hi = min(lo, self._shard_ids[0]), max(hi, self._shard_ids[1])
        self._shard_ids = (lo, hi)
        self._batch_rows.append(batch.num_rows)
        if shard.size >= self.shard_bytes:
            self._finish_shard()

    def _refuse_repeats(self, ids: np.ndarray) -> NoReturn:
        """AlignmentError naming the ids of a batch that repeat the store's or its own."""
        held = self._ids.contains(ids)
        inside = repeats(ids)
        stored = np.unique(ids[held])
        why = []
        if len(stored):
            why.append(f"{len(stored)} already in the store (first: {_few(stored)})")
        if len(inside):
            why.append(f"{len(inside)} repeated within the batch (first: {_few(inside)})")
        name = self._teacher_name
        raise AlignmentError(
            f"teacher {name!r} wrote a batch of sample ids that {self.path} would hold twice: "
            f"{'; '.join(why)}. Nothing of the batch was written. Give every sample its own "
            f"id, and when resuming skip the samples StoreWriter.holds() reports",
            teacher=name,
            teachers=(name, name),
            sample_ids=tuple(int(i) for i in np.union1d(stored, inside)[:5]),
            path=str(self.path),
        )

    def flush(self) -> None:
        """Complete the shard in progress now, making every row written so far durable."""
        if self._open_shard is not None:
            self._finish_shard()

    def close(self, complete: bool = True) -> None:
        """Complete the last shard and mark the store complete (``complete=False``: leave
        it marked incomplete, for a dump that failed or was stopped). Idempotent."""
        if self._closed:
            return
        self.flush()
        self._write_manifest(complete=complete)
        self._closed = True
        self._unlock()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        """Close; a block that raised leaves the store incomplete (a re-run resumes it)."""
        self.close(complete=exc_type is None)

    def _open_new_shard(self) -> None:
        """Start the next shard, under its ``.tmp`` name until it is complete."""
        name = f"shard-{self._next_index:05d}.arrow"
        self._next_index += 1
        tmp = self.path / (name + TMP)
        shard = ShardFile(tmp)
        sink = pa.PythonFile(shard, mode="w")
        writer = pa.ipc.new_file(sink, self._arrow_schema, options=self._ipc)
        self._open_shard = (shard, writer, tmp)
        self._batch_rows = []
        self._shard_ids = None

    def _finish_shard(self) -> None:
        """Make the shard in progress durable, give it its name, then list it."""
        assert self._open_shard is not None
        shard, writer, tmp = self._open_shard
        writer.close()
        size = shard.size
        crc32 = shard.finish()
        final = tmp.with_name(tmp.name[: -len(TMP)])
        os.replace(tmp, final)
        fsync(self.path)
        lo, hi = self._shard_ids if self._shard_ids else (None, None)
        info = ShardInfo(final.name, size, crc32, lo, hi, tuple(self._batch_rows))
        self._shards.append(info)
        self._open_shard = None
        self._batch_rows = []
        self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool) -> None:
        """Record the complete shards (and whether the store is complete) atomically."""
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "created": self._created,
            "updated": timestamp(),
            "complete": complete,
            "rows": sum(s.rows for s in self._shards),
            "teacher": self._teacher,
            "schema": self.schema.to_json(),
            "shards": [s.to_json() for s in self._shards],
        }
        write_manifest(self.path, manifest)


def ipc_options(compression: Compression) -> pa.ipc.IpcWriteOptions:
    """Arrow IPC options for shards compressed with ``compression`` (checked)."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {list(COMPRESSIONS)}, got {compression!r}")
    return pa.ipc.IpcWriteOptions(compression="lz4_frame" if compression == "lz4" else compression)


def _few(ids: np.ndarray, n: int = 5) -> str:
    """The first ``n`` of ``ids``, as ``[1, 2, 3, ...]``."""
    shown = ", ".join(str(int(i)) for i in ids[:n])
    return f"[{shown}{', ...' if len(ids) > n else ''}]"
