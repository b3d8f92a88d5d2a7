"""Passes from a teacher pool over the student's own data (what EDL's DistillReader did):
each batch goes to one replica, its knowledge comes back beside its inputs."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from kdserve.ray.pool import PoolClient

__all__ = ["PoolLoader"]

Data = Iterable[Mapping[str, Any]] | Callable[[int], Iterable[Mapping[str, Any]]]


class PoolLoader:
    """Each iteration is one pass: every batch of ``data`` (this rank's share: batch ``i``
    belongs to rank ``i % world_size``) is answered by one replica of pool ``name``, and
    yielded as its inputs plus the knowledge, in order.

    Every batch is answered once: a replica that fails or dies mid-pass has its batch
    asked of another, and the pool may grow or shrink meanwhile. ``data`` is an iterable
    of input batches (dicts of arrays, with ``sample_id`` or numbered per batch) or a
    function of the pass number (to shuffle each pass). ``max_in_flight`` batches are
    asked at once (default: 2 per replica when the pass starts).
    """

    def __init__(
        self,
        name: str,
        data: Data,
        *,
        rank: int = 0,
        world_size: int = 1,
        max_in_flight: int | None = None,
        decode: bool = True,
        timeout: float = 60.0,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..world_size-1, got rank={rank} of {world_size}")
        self.client = PoolClient(name, timeout=timeout)
        self.data = data
        self.rank, self.world_size = rank, world_size
        self.max_in_flight = max_in_flight
        self.decode = decode
        self.epoch = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        batches = self.data(epoch) if callable(self.data) else self.data
        asked: collections.deque[Mapping[str, Any]] = collections.deque()

        def mine() -> Iterator[Mapping[str, Any]]:
            for i, inputs in enumerate(batches):
                if i % self.world_size == self.rank:
                    asked.append(inputs)
                    yield inputs

        in_flight = self.max_in_flight or 2 * max(1, self.client.replicas())
        for knowledge in self.client.query_stream(mine(), in_flight, decode=self.decode):
            yield {**asked.popleft(), **knowledge}
