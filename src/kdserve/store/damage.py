"""Finding damaged shards and setting them aside: the checks a resuming writer,
:func:`stored_rows` and :func:`repair` (``kdserve verify --repair``) share."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow as pa

from kdserve.errors import StoreError
from kdserve.store.files import crc32_file, fsync
from kdserve.store.lock import StoreLock
from kdserve.store.manifest import (
    DAMAGED,
    MANIFEST,
    ShardInfo,
    parse_manifest,
    read_manifest,
    timestamp,
    write_manifest,
)

__all__ = [
    "last_shard_problem",
    "repair",
    "repair_advice",
    "schema_difference",
    "set_aside",
    "shard_problem",
    "stored_rows",
]

_log = logging.getLogger(__name__)
# store -> (last shard file, its stat and crc32) when its crc32 last matched
_last_matched: dict[Path, tuple[Path, tuple[int, ...]]] = {}


def repair_advice(store: Path, rows: int) -> str:
    """What to do about a damaged shard of ``rows`` samples (the same advice everywhere)."""
    return (
        f"run `kdserve verify --repair {store}` to set it aside, then re-run the dump to "
        f"regenerate its {rows} samples (it resumes and writes only the missing ones), or "
        f"restore the file"
    )


def shard_problem(store: Path, info: ShardInfo, *, crc: bool) -> str | None:
    """What is wrong on disk with a listed shard (missing, size, and crc32 if ``crc``)."""
    f = store / info.file
    if not f.is_file():
        return "missing (not on disk)"
    size = f.stat().st_size
    if size != info.bytes:
        return f"truncated or altered ({size} bytes on disk, the manifest says {info.bytes})"
    if crc:
        got = crc32_file(f)
        if got != info.crc32:
            return f"corrupted (crc32 {got:08x}, the manifest says {info.crc32:08x})"
    return None


def last_shard_problem(store: Path, info: ShardInfo) -> str | None:
    """:func:`shard_problem` with crc32 for a store's last shard, hashed once while the file
    stays the same (inode, size, mtime, ctime): a dump asks :func:`stored_rows`, then
    its writer resumes, and both check the last shard."""
    f = store / info.file
    try:  # stat before hashing: a change made while it hashes is seen next time
        st = f.stat()
    except OSError:
        return shard_problem(store, info, crc=True)
    seen = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, info.crc32)
    if _last_matched.get(store) == (f, seen):
        return None
    problem = shard_problem(store, info, crc=True)
    if problem is None:
        _last_matched[store] = (f, seen)
    return problem


def _parse_problem(f: Path, info: ShardInfo, schema: pa.Schema) -> str | None:
    """What keeps a shard from reading as the manifest describes it, or None."""
    try:
        with pa.memory_map(str(f)) as source:
            reader = pa.ipc.open_file(source)
            if not reader.schema.equals(schema):
                return schema_difference(reader.schema, schema)
            if reader.num_record_batches != len(info.batch_rows):
                return (
                    f"it holds {reader.num_record_batches} batches, the manifest says "
                    f"{len(info.batch_rows)}"
                )
            for index, rows in enumerate(info.batch_rows):
                batch = reader.get_batch(index)
                batch.validate(full=True)
                if batch.num_rows != rows:
                    return f"its batch {index} holds {batch.num_rows} rows, not {rows}"
    except (pa.ArrowException, OSError, ValueError) as exc:
        return f"it does not parse ({exc})"
    return None


def schema_difference(got: pa.Schema, want: pa.Schema) -> str:
    """How a shard's Arrow schema ``got`` differs from the manifest's ``want``, in words."""
    if got.names != want.names:
        return f"columns {got.names}, the manifest says {want.names}"
    for a, b in zip(got, want, strict=True):
        if a.type != b.type:
            return f"column {a.name!r} is {a.type}, the manifest says {b.type}"
        if a.metadata != b.metadata:
            return f"column {a.name!r} is described {a.metadata}, the manifest says {b.metadata}"
    return "its schema's metadata differs from the manifest's"


def set_aside(f: Path) -> str:
    """Rename a damaged shard to ``<name>.damaged`` (never over an earlier one); what
    became of it, for the warning that names it."""
    if not f.exists():
        return "nothing to set aside"
    target = f.with_name(f.name + DAMAGED)
    n = 0
    while target.exists():
        n += 1
        target = f.with_name(f"{f.name}{DAMAGED}.{n}")
    os.replace(f, target)
    fsync(f.parent)
    return target.name


def stored_rows(path: str | os.PathLike[str]) -> int:
    """Rows a store at ``path`` durably holds (0 if there is no store yet).

    A damaged last shard does not count: a writer resuming the store sets it aside.
    """
    store = Path(path)
    if not (store / MANIFEST).exists():
        return 0
    _, shards = parse_manifest(store, read_manifest(store))
    rows = sum(s.rows for s in shards)
    if shards and last_shard_problem(store, shards[-1]) is not None:
        rows -= shards[-1].rows
    return rows


def repair(path: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """Set aside every damaged shard of a store so it reads again; ``(file, rows lost)`` each.

    Each listed shard is checked (on disk, size, crc32, parses as the manifest says); a
    damaged one is renamed ``<file>.damaged`` (never deleted) and dropped from the
    manifest, and the store is marked incomplete. Re-running the dump regenerates the
    lost samples. Takes the store's lock: refused while a writer is writing it.
    """
    store = Path(path)
    read_manifest(store)  # a clear error if there is no store here, before locking
    with StoreLock(store):
        manifest = read_manifest(store)
        schema, shards = parse_manifest(store, manifest)
        arrow_schema = schema.to_arrow()
        kept: list[ShardInfo] = []
        lost: list[tuple[str, int]] = []
        for s in shards:
            f = store / s.file
            problem = shard_problem(store, s, crc=True)
            if problem is None and (problem := _parse_problem(f, s, arrow_schema)) is not None:
                # its crc32 matches the manifest's, so the shard is as written: the
                # manifest is what changed, and setting shards aside would lose them
                raise StoreError(
                    f"{store / MANIFEST} is damaged: shard {s.file} is intact (its crc32 "
                    f"matches) but {problem}. Nothing was set aside; restore {MANIFEST} "
                    f"from a backup or re-run the dump into a new directory",
                    path=str(store / MANIFEST),
                )
            if problem is None:
                kept.append(s)
                continue
            _log.warning(
                "store %s: shard %s is %s; set it aside (%s), %d samples (ids %s..%s) lost "
                "until the dump is re-run",
                store,
                s.file,
                problem,
                set_aside(f),
                s.rows,
                s.min_sample_id,
                s.max_sample_id,
            )
            lost.append((s.file, s.rows))
        if lost:
            manifest.update(
                complete=False,
                updated=timestamp(),
                rows=sum(s.rows for s in kept),
                shards=[s.to_json() for s in kept],
            )
            write_manifest(store, manifest)
    return lost
