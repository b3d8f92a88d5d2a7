"""Passes: one pass over a student's teachers, as one batch per teacher per step, aligned
by sample id and re-batched to the student's batch size. With served teachers, their
streams set the order and stores are looked up by id; with stores only, the first store
sets the (possibly shuffled) order and the others are read in step with it."""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from kdserve.core.batch import sample_ids
from kdserve.core.prefetch import Prefetcher
from kdserve.core.rebatch import rebatch
from kdserve.core.sampler import Sampler
from kdserve.errors import AlignmentError
from kdserve.online.patience import patience
from kdserve.student.sources import StoreSource, StreamSource

__all__ = ["Step", "served_pass", "store_pass"]

_log = logging.getLogger(__name__)

Step = dict[str, pa.RecordBatch]
"""One step of a pass: each teacher's batch, by teacher name, holding the same samples."""


def store_pass(
    stores: Sequence[StoreSource], sampler: Sampler, epoch: int, batch_size: int, drop_last: bool
) -> Iterator[Step]:
    """A pass over stores only, in the sampler's order for ``epoch``."""
    blocks = sampler.plan(len(stores[0]), epoch)
    streams = [rebatch(s.batches(blocks), batch_size, drop_last) for s in stores]
    for batches in zip(*streams, strict=True):
        yield {s.name: b for s, b in zip(stores, batches, strict=True)}


def served_pass(
    teachers: Sequence[StreamSource],
    stores: Sequence[StoreSource],
    sampler: Sampler,
    epoch: int,
    batch_size: int,
    drop_last: bool,
    buf_size: int,
    stall_timeout: float | None,
) -> Iterator[Step]:
    """A pass driven by served teachers' streams (the first one's order); stores are
    looked up by the ids of each batch. A teacher that sends nothing while the pass
    waits for it is warned about each minute, and given up on after ``stall_timeout``."""
    for t in teachers:
        t.check_pass(epoch)
    served = [0]  # rows the driver served this rank, before re-batching
    shares = [t.share(epoch, sampler) for t in teachers]
    shares[0] = _counted(shares[0], served)
    # Each teacher is read by its own thread, buf_size batches ahead: network reads of
    # several teachers overlap, and a slow student still slows them all down.
    streams = [
        Prefetcher(
            functools.partial(rebatch, share, batch_size, drop_last),
            buf_size,
            f"kdserve-{t.name}",
            on_wait=patience(t.name, f"pass {epoch}", stall_timeout),
            cancel=t.cancel,  # a thread blocked reading a teacher that sends nothing returns
        )
        for t, share in zip(teachers, shares, strict=True)
    ]
    driver = teachers[0]
    try:
        for batches in itertools.zip_longest(*streams):
            if any(b is None for b in batches):
                short = [t.name for t, b in zip(teachers, batches, strict=True) if b is None]
                raise AlignmentError(
                    f"online teachers {short} ended pass {epoch} before {driver.name!r}: they "
                    f"do not serve the same samples",
                    teachers=(driver.name, short[0]),
                    sample_ids=(None, None),
                )
            step = {t.name: b for t, b in zip(teachers, batches, strict=True)}
            ids = sample_ids(step[driver.name])
            if sampler.world_size > 1:
                _same_share(step, teachers, ids, sampler.world_size)
            for store in stores:
                step[store.name] = store.lookup(ids, driver.name)
            yield step
    finally:
        for stream in streams:
            stream.close()
    if sampler.world_size == 1:  # one rank reads the whole pass: stores hold no more
        for store in stores:
            store.check_served(served[0], driver.name, epoch)


def _counted(batches: Iterator[pa.RecordBatch], rows: list[int]) -> Iterator[pa.RecordBatch]:
    """``batches``, their rows added to ``rows[0]``."""
    for batch in batches:
        rows[0] += batch.num_rows
        yield batch


def _same_share(
    step: Step, teachers: Sequence[StreamSource], ids: np.ndarray, world_size: int
) -> None:
    """AlignmentError if served teachers gave this rank different samples: each deals its
    own batches to the ranks in turn, so their shares match only if they batch alike."""
    driver = teachers[0].name
    for t in teachers[1:]:
        other = sample_ids(step[t.name])
        if not np.array_equal(np.sort(other), np.sort(ids)):
            raise AlignmentError(
                f"online teachers {driver!r} and {t.name!r} gave this rank different "
                f"samples: each deals its own batches whole to the {world_size} ranks (times "
                f"loader workers), so teachers merged online must serve the same samples in "
                f"batches of the same sizes, in the same order. Give their readers one batch "
                f"size, or dump one of them to a store (stores follow the online teacher's "
                f"batches)",
                teachers=(driver, t.name),
                sample_ids=(_first(ids), _first(other)),
            )


def _first(ids: np.ndarray) -> int | None:
    return int(ids[0]) if len(ids) else None
