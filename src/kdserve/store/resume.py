"""What a writer reopening a store keeps: its complete shards (leftovers of a writer that
died removed, a damaged last shard set aside), the sample ids they hold, and the number
its next shard takes."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa

from kdserve.core.batch import sample_ids
from kdserve.core.idset import IdSet
from kdserve.errors import StoreError
from kdserve.store.damage import last_shard_problem, repair_advice, set_aside, shard_problem
from kdserve.store.manifest import SHARD_FILE, SHARD_INDEX, ShardInfo

__all__ = ["kept_shards", "next_shard_index", "stored_ids"]

_log = logging.getLogger(__name__)


def kept_shards(store: Path, shards: list[ShardInfo]) -> list[ShardInfo]:
    """The listed shards a resumed writer keeps, with the files it leaves tidied: unlisted
    shard files removed, a damaged last shard set aside (a warning names it); StoreError
    if an earlier shard is missing or truncated."""
    listed = {s.file for s in shards}
    for p in store.iterdir():  # leftovers of a writer that died mid-shard
        if SHARD_FILE.fullmatch(p.name) and p.name not in listed:
            p.unlink()
    for s in shards[:-1]:
        problem = shard_problem(store, s, crc=False)
        if problem is not None:
            raise StoreError(
                f"cannot resume {store}: shard {s.file} is missing or truncated: "
                f"{problem}. It is not the last shard, so it was not set aside "
                f"automatically: {repair_advice(store, s.rows)} (or pass "
                f"overwrite=True to start the store over)",
                path=str(store / s.file),
            )
    if not shards:
        return shards
    # Only the last shard can be damaged by the writer dying (or its disk losing the
    # tail of the writes): check all of it, and set it aside if it is damaged.
    last = shards[-1]
    problem = last_shard_problem(store, last)
    if problem is None:
        return shards
    _log.warning(
        "store %s: its last shard %s is %s; set it aside (%s) and resuming "
        "without its %d samples (ids %s..%s): the dump regenerates them",
        store,
        last.file,
        problem,
        set_aside(store / last.file),
        last.rows,
        last.min_sample_id,
        last.max_sample_id,
    )
    return shards[:-1]


def stored_ids(store: Path, shards: list[ShardInfo]) -> IdSet:
    """The sample ids of the complete shards: a shard whose rows fill its id range is
    that range (from the manifest alone), others' ids are read from the shard."""
    ids = IdSet()
    for s in shards:
        if s.min_sample_id is None or s.max_sample_id is None:
            continue
        if s.rows == s.max_sample_id - s.min_sample_id + 1:
            ids.add_range(s.min_sample_id, s.max_sample_id + 1)
        else:
            ids.add(_read_sample_ids(store, s))
    rows = sum(s.rows for s in shards)
    if len(ids) < rows:
        _log.warning(
            "store %s holds %d rows but %d distinct sample ids: it was written by a "
            "kdserve that did not refuse repeated ids",
            store,
            rows,
            len(ids),
        )
    return ids


def next_shard_index(store: Path, shards: Iterable[ShardInfo]) -> int:
    """A shard number above every listed shard and every file named like one (``.damaged``
    included), so a new shard never takes the name of a shard set aside."""
    names = [s.file for s in shards] + [p.name for p in store.iterdir()]
    numbers = [int(m.group(1)) for m in map(SHARD_INDEX.match, names) if m]
    return max(numbers, default=-1) + 1


def _read_sample_ids(store: Path, info: ShardInfo) -> np.ndarray:
    """The sample id column of a shard (only that column's pages are read)."""
    f = store / info.file
    try:
        with pa.memory_map(str(f)) as source:
            reader = pa.ipc.open_file(source)
            parts = [
                np.array(sample_ids(reader.get_batch(i))) for i in range(reader.num_record_batches)
            ]
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise StoreError(
            f"cannot resume {store}: shard {f} is unreadable ({exc}); "
            f"{repair_advice(store, info.rows)}",
            path=str(f),
        ) from None
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)
