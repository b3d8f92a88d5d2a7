"""A teacher pool as one of a Student's teachers (``Student.add_pool``,
``register_teacher(in_pool=...)``): its passes, over the pool's own data, drive the
student's like a served teacher's, and stores registered beside it follow them.

The pool computes each part of a pass on one replica when a student needs it, and the
knowledge reaches the student through Ray's object store as an Arrow IPC stream -- read
without a copy, never pickled."""

from __future__ import annotations

import collections
import functools
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from kdserve._version import __version__
from kdserve.core.batch import Knowledge, sample_ids
from kdserve.core.idset import IdSet
from kdserve.core.sampler import Sampler
from kdserve.core.schema import Schema
from kdserve.errors import KdserveError
from kdserve.online.client import TeacherClient
from kdserve.ray.pool import PoolClient, find_pool
from kdserve.student.sources import StreamSource, describe_teacher
from kdserve.student.vocab_map import VocabMap

__all__ = ["PoolSource"]

_AHEAD = 2  # parts asked for before they are read, per replica of the pool


class PoolSource(StreamSource):
    """The pool named ``pool``: part ``i`` of each pass is rank ``i % world_size``'s."""

    def __init__(
        self,
        name: str,
        pool: str,
        expect: Mapping[str, Any] | None = None,
        vocab_map: VocabMap | None = None,
    ) -> None:
        super().__init__(name, expect, vocab_map)
        self.pool = pool
        self._registry = find_pool(pool)
        self.parts = 0

    def open(self) -> None:
        self.parts = ray.get(self._registry.layout.remote())
        if not self.parts:
            raise KdserveError(
                f"teacher pool {self.pool!r} serves no passes: call pool.serve(data_factory) "
                f"before a student registers it"
            )
        self.check_expect(self.comparable)

    @functools.cached_property
    def schema(self) -> Schema:
        """From the pool's first part that holds a batch (which its rank then reads from
        the object store)."""
        for part in range(self.parts):
            ref = ray.get(self._registry.part.remote(0, part))[0]
            data = fetch_part(self._registry, self.pool, 0, part, ref)
            if len(data):  # (a part with no batch is an empty stream)
                return Schema.from_arrow(pa.ipc.open_stream(pa.py_buffer(data)).schema)
        raise KdserveError(
            f"teacher pool {self.pool!r}: none of the {self.parts} parts of its first pass "
            f"holds a batch; its data_factory yields nothing for any part"
        )

    @functools.cached_property
    def provenance(self) -> dict[str, Any]:
        recorded: dict[str, Any] = ray.get(self._registry.recorded.remote())
        return recorded

    def _unexpected(self, what: str) -> KdserveError:
        return KdserveError(
            f"teacher pool {self.pool!r} records provenance {what}: it serves another "
            f"teacher's knowledge (None: not recorded; TeacherPool(provenance=...)), or "
            f"drop those names from expect=",
            teacher=self.name,
        )

    def describe(self) -> dict[str, Any]:
        where = {"pool": self.pool, "parts": self.parts}
        return describe_teacher(
            where, self.pool, None, __version__, self.provenance, self.schema, self.vocab_map
        )

    def check_pass(self, epoch: int) -> None:
        """A pool serves every pass it is asked for."""

    def share(self, epoch: int, sampler: Sampler) -> Iterator[pa.RecordBatch]:
        """This rank's parts (``i % world_size == rank``), each sample once; with several
        ranks, evened to the others' shares (``sampler.even``) by the parts' rows."""
        world = sampler.world_size
        if world > 1 and sampler.even != "none" and self.parts < world:
            raise KdserveError(
                f"teacher pool {self.pool!r} serves {self.parts} part(s) a pass, fewer than "
                f"the {world} ranks: pool.serve(..., parts=at least {world}), or "
                f"even_ranks='none'"
            )
        mine = list(range(sampler.rank, self.parts, world))
        _, replicas = ray.get(self._registry.lookup.remote())
        ahead = _AHEAD * max(1, len(replicas))  # enough to keep every replica busy
        seen = IdSet()

        def batches() -> Iterator[pa.RecordBatch]:
            for batch in part_batches(self._registry, self.pool, epoch, mine, ahead):
                ids = sample_ids(batch)
                if not seen.add_new(ids):  # parts that overlap: the data factory's mistake
                    self._refuse_repeated(ids, seen, epoch)
                yield batch

        def shares() -> list[int]:
            rows = part_rows(self._registry, self.pool, epoch)
            return [sum(rows[rank::world]) for rank in range(world)]

        return self._evened(batches(), sampler, shares)

    def query(
        self, batches: Iterable[Mapping[str, Any]], max_in_flight: int, decode: bool
    ) -> Iterator[Knowledge]:
        def read(answer: pa.RecordBatch) -> Knowledge:  # through the vocab_map, if any
            return self.knowledge(answer, decode, Schema.from_arrow(answer.schema))

        return PoolClient(self.pool).query_stream(batches, max_in_flight, read=read)

    def client(self) -> TeacherClient:
        raise KdserveError(
            f"teacher {self.name!r} is a Ray teacher pool: it has no messages (send/recv); "
            f"ask it with query()"
        )


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
        rows = 0
        for batch in pa.ipc.open_stream(pa.py_buffer(data)) if len(data) else []:
            rows += batch.num_rows
            yield batch
        registry.taken.remote(epoch, part, rows)
    student = f"{socket.gethostname()}:{os.getpid()}:passes:{parts[0] if parts else 0}"
    figures = {"batches": float(read), "stall_s": stall, "in_flight": depth / max(read, 1)}
    registry.report.remote(student, {}, figures)


def fetch_part(registry: Any, pool: str, epoch: int, part: int, ref: Any) -> np.ndarray:
    """A part's Arrow stream; asked of another replica while its replica is gone."""
    data: np.ndarray = _fetch(registry, pool, epoch, part, ref, 0)
    return data


def part_rows(registry: Any, pool: str, epoch: int) -> list[int]:
    """Every part's rows in pass ``epoch`` (parts not yet read are computed for it)."""
    rows = ray.get(registry.rows.remote(epoch))
    return [
        int(n if isinstance(n, int) else _fetch(registry, pool, epoch, part, n[0], 1))
        for part, n in enumerate(rows)
    ]


def _fetch(registry: Any, pool: str, epoch: int, part: int, ref: Any, which: int) -> Any:
    """Object ``which`` of a part's result (0: its Arrow stream, 1: its rows), asked of
    another replica while the one computing it is gone."""
    for _ in range(16):
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError:  # died for good, with the part unfinished
            again = ray.get(registry.again.remote(epoch, part))
            if isinstance(again, int):  # its rows: read meanwhile (only asked with which=1)
                return again
            ref = again[which]
    raise KdserveError(f"teacher pool {pool!r}: part {part} of pass {epoch} failed 16 times")
