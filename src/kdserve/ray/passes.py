"""Passes over a teacher pool's own data: the pool computes each part of a pass on one
replica when a student needs it, and the knowledge reaches the student through Ray's
object store as an Arrow IPC stream -- read without a copy, never pickled."""

from __future__ import annotations

import collections
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from kdserve.core.batch import Knowledge, from_record_batch
from kdserve.core.rebatch import rebatch
from kdserve.errors import KdserveError
from kdserve.ray.pool import find_pool

__all__ = ["PoolPasses", "fetch_part", "part_batches"]


class PoolPasses:
    """Each iteration is one pass of pool ``name``'s data (:meth:`TeacherPool.serve`),
    this rank's share of it -- part ``i`` belongs to rank ``i % world_size`` -- in
    batches of ``batch_size``.

    Every sample comes once per pass with its exact knowledge: a part whose replica dies
    is computed by the restarted replica (Ray retries it) or, if the replica is gone, by
    another. ``ahead`` parts are asked for before they are read, so the replicas work
    while the student trains.
    """

    def __init__(
        self,
        name: str,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        decode: bool = True,
        ahead: int = 4,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..world_size-1, got rank={rank} of {world_size}")
        self._registry = find_pool(name)
        self.parts = ray.get(self._registry.layout.remote())
        if not self.parts:
            raise KdserveError(
                f"teacher pool {name!r} serves no passes: call pool.serve(data_factory) first"
            )
        self.name = name
        self.batch_size, self.drop_last, self.decode = batch_size, drop_last, decode
        self.rank, self.world_size = rank, world_size
        self.ahead = ahead
        self.epoch = 0

    def __iter__(self) -> Iterator[Knowledge]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        mine = list(range(self.rank, self.parts, self.world_size))
        stream = part_batches(self._registry, self.name, epoch, mine, self.ahead)
        for batch in rebatch(stream, self.batch_size, self.drop_last):
            yield from_record_batch(batch, decode=self.decode)


def part_batches(
    registry: Any, pool: str, epoch: int, parts: list[int], ahead: int
) -> Iterator[pa.RecordBatch]:
    """The record batches of ``parts`` of pass ``epoch``, in order, ``ahead`` parts asked
    for early; each part let go of (out of the object store) once read. At the end of
    the pass the time spent waiting for parts (stall) goes to the pool's figures."""
    asked: collections.deque[tuple[int, Any]] = collections.deque()
    todo = iter(parts)
    stall, depth, read = 0.0, 0, 0
    while True:
        while len(asked) < ahead and (part := next(todo, None)) is not None:
            asked.append((part, registry.part.remote(epoch, part)))
        if not asked:
            break
        depth += len(asked)
        part, pending = asked.popleft()
        start = time.perf_counter()
        data = fetch_part(registry, pool, epoch, part, ray.get(pending)[0])
        stall += time.perf_counter() - start
        read += 1
        yield from pa.ipc.open_stream(pa.py_buffer(data)) if len(data) else []
        registry.taken.remote(epoch, part)
    student = f"{socket.gethostname()}:{os.getpid()}:passes:{parts[0] if parts else 0}"
    figures = {"batches": float(read), "stall_s": stall, "in_flight": depth / max(read, 1)}
    registry.report.remote(student, {}, figures)


def fetch_part(registry: Any, pool: str, epoch: int, part: int, ref: Any) -> np.ndarray:
    """A part's Arrow stream; asked of another replica while its replica is gone."""
    for _ in range(16):
        try:
            data: np.ndarray = ray.get(ref)
            return data
        except ray.exceptions.RayActorError:  # died for good, with the part unfinished
            owner = ray.get(registry.owner.remote(epoch, part))
            ref = ray.get(registry.part.remote(epoch, part, owner))[0]
    raise KdserveError(f"teacher pool {pool!r}: part {part} of pass {epoch} failed 16 times")
