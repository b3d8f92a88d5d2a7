"""The teacher's replay window: knowledge batches kept until the student who owns them has them.

Batches are numbered ``(pass, seq)``; with ``world_size`` data-parallel students, batch
``seq`` belongs to rank ``seq % world_size``, so the ranks split every pass and together
get every batch exactly once. A batch stays in the window until its rank acknowledges
a position past it (a request for ``(pass, seq)`` acknowledges everything before it),
so a student that loses its connection asks again from where it stopped and gets the
same batches. The producer blocks while ``buf_size * world_size`` batches *and* at least
``min_bytes`` wait (small batches would otherwise leave the producer idle): a slow
student slows its teacher instead of growing its memory.

A teacher that was restarted starts with an empty window: the first requests tell it
where each rank stands, and its producer regenerates only what they still need.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pyarrow as pa

from kdserve.core.wait import slices
from kdserve.errors import ProtocolError

__all__ = ["MIN_WINDOW_BYTES", "Position", "ReplayWindow", "WindowStoppedError"]

Position = tuple[int, int]
"""``(pass, seq)``: a batch, or for a rank the next batch it needs."""

MIN_WINDOW_BYTES = 64 << 20  # the window holds at least this much, however small the batches


class WindowStoppedError(Exception):
    """The window was stopped (teacher closing, or its producer failed) during a wait."""

    def __init__(self, why: str, failed: bool = False) -> None:
        super().__init__(why)
        self.failed = failed
        """The producer failed: a student asking again would never get the batches."""


class ReplayWindow:
    """Batches of ``times`` passes between one producer and the ranks of a student group."""

    def __init__(self, times: int, buf_size: int, min_bytes: int = MIN_WINDOW_BYTES) -> None:
        self.times = times
        self.buf_size = buf_size
        self.min_bytes = min_bytes
        self._cond = threading.Condition()
        self._batches: dict[Position, pa.RecordBatch] = {}
        self._bytes = 0  # held by the batches in the window
        self._ends: dict[int, int] = {}  # pass -> number of batches, once the pass is over
        self._rows: dict[int, dict[int, int]] = {}  # pass -> seq -> rows of that batch
        self._resume: dict[int, Position] = {}  # rank -> next position it needs
        self._world: int | None = None
        self._first_request: float | None = None
        self._stopped: str | None = None  # why the window stopped
        self._failed = False  # it stopped because its producer failed

    # -- shared ---------------------------------------------------------------------

    def stop(self, why: str = "the teacher is closing", failed: bool = False) -> None:
        """Wake every waiter with WindowStoppedError(why); ``failed``: the producer failed."""
        with self._cond:
            if self._stopped is None:
                self._stopped, self._failed = why, failed
            self._cond.notify_all()

    def _wait(self, ready: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait (holding the lock) until ``ready()`` holds (True), ``timeout`` seconds
        pass (False) or stop() is called (WindowStoppedError)."""
        for step in slices(timeout):
            if self._ready(ready):
                return True
            self._cond.wait(step)
        return self._ready(ready)

    def _ready(self, ready: Callable[[], bool]) -> bool:
        """``ready()``; WindowStoppedError instead of False once the window is stopped."""
        if ready():
            return True
        if self._stopped:
            raise WindowStoppedError(self._stopped, self._failed)
        return False

    def _owner(self, seq: int) -> int:
        assert self._world is not None
        return seq % self._world

    def _drop_acknowledged(self, rank: int) -> None:
        before = self._resume[rank]
        for key in [k for k in self._batches if self._owner(k[1]) == rank and k < before]:
            self._bytes -= self._batches.pop(key).get_total_buffer_size()

    # -- producer -------------------------------------------------------------------

    def wait_for_students(self, grace: float) -> int:
        """Block until a student asks for knowledge; give the other ranks ``grace`` seconds
        to say where they stand. Returns the world size."""
        with self._cond:
            self._wait(lambda: self._first_request is not None)
            assert self._world is not None and self._first_request is not None
            left = self._first_request + grace - time.monotonic()
            self._wait(lambda: len(self._resume) >= (self._world or 1), left)
            return self._world

    def needed(self, position: Position) -> bool:
        """Whether the rank owning ``position`` still needs it (unknown ranks need all)."""
        with self._cond:
            return position >= self._resume.get(self._owner(position[1]), (0, 0))

    def pass_needed(self, pass_: int) -> bool:
        """False when every rank is known to be past pass ``pass_`` (after a restart)."""
        with self._cond:
            assert self._world is not None
            return any(self._resume.get(r, (0, 0))[0] <= pass_ for r in range(self._world))

    def put(self, position: Position, batch: pa.RecordBatch) -> None:
        """Add a batch; blocks while the window is full."""
        with self._cond:
            limit = self.buf_size * (self._world or 1)
            self._wait(lambda: len(self._batches) < limit or self._bytes < self.min_bytes)
            if position >= self._resume.get(self._owner(position[1]), (0, 0)):
                self._batches[position] = batch
                self._bytes += batch.get_total_buffer_size()
                self._cond.notify_all()

    def count_rows(self, position: Position, rows: int) -> None:
        """Batch ``position`` has ``rows`` rows (counted for every batch, needed or not, so
        that :meth:`rank_rows` knows each rank's share even after a restart)."""
        with self._cond:
            self._rows.setdefault(position[0], {})[position[1]] = rows

    def end_pass(self, pass_: int, batches: int) -> None:
        """Pass ``pass_`` is over: it has ``batches`` batches."""
        with self._cond:
            self._ends[pass_] = batches
            self._cond.notify_all()

    def rank_rows(self, pass_: int, world_size: int, timeout: float) -> list[int] | None:
        """Rows each of ``world_size`` ranks gets in pass ``pass_``, once the pass is over
        (None if it is not within ``timeout`` seconds): students even their shares."""
        with self._cond:
            if not self._wait(lambda: pass_ in self._ends, timeout):
                return None
            rows = self._rows.get(pass_, {})
            totals = [0] * world_size
            for seq in range(self._ends[pass_]):
                totals[seq % world_size] += rows.get(seq, 0)
            return totals

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Block until every rank has acknowledged the end of the last pass."""
        with self._cond:
            return self._wait(
                lambda: (
                    self._world is not None
                    and len(self._resume) == self._world
                    and all(p >= (self.times, 0) for p in self._resume.values())
                ),
                timeout,
            )

    # -- students -------------------------------------------------------------------

    def _register(self, rank: int, world_size: int, position: Position) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ProtocolError(f"rank {rank} is outside world_size {world_size}")
        if self._world is None:
            self._world = world_size
        elif world_size != self._world:
            raise ProtocolError(
                f"a student asked with world_size={world_size}, but this teacher serves a "
                f"group of {self._world}; every rank must use the same world_size"
            )
        if self._first_request is None:
            self._first_request = time.monotonic()
        self._resume[rank] = max(self._resume.get(rank, (0, 0)), position)
        self._drop_acknowledged(rank)
        self._cond.notify_all()

    def ack(self, rank: int, world_size: int, position: Position) -> None:
        """Rank ``rank`` has every one of its batches before ``position``."""
        pass_, seq = position
        if not 0 <= pass_ <= self.times or seq < 0:
            raise ProtocolError(
                f"an acknowledgement of batch {seq} of pass {pass_}, but this teacher serves "
                f"{self.times} pass(es)"
            )
        if world_size >= 1 and seq % world_size != rank:
            raise ProtocolError(f"batch {seq} does not belong to rank {rank} of {world_size}")
        with self._cond:
            self._register(rank, world_size, position)

    def stream(
        self, pass_: int, seq: int, rank: int, world_size: int
    ) -> Iterator[tuple[int, pa.RecordBatch]]:
        """Rank ``rank``'s batches of pass ``pass_`` from ``seq`` on, waiting for each."""
        if not 0 <= pass_ < self.times:
            raise ProtocolError(
                f"pass {pass_} was asked for, but this teacher serves {self.times} pass(es) "
                f"(times={self.times})"
            )
        if world_size < 1 or seq < 0 or seq % world_size != rank:
            raise ProtocolError(f"batch {seq} does not belong to rank {rank} of {world_size}")
        with self._cond:
            if (pass_, seq) < self._resume.get(rank, (0, 0)):
                raise ProtocolError(
                    f"rank {rank} asked again for batch {seq} of pass {pass_}, which it had "
                    f"acknowledged; the teacher no longer holds it. A student reads each pass "
                    f"of a served teacher once: with KnowledgeDataset, call "
                    f"dataset.set_epoch(epoch) before each pass"
                )
            self._register(rank, world_size, (pass_, seq))
        while True:
            batch = self._next_batch(pass_, seq)
            if batch is None:
                return  # the pass is over for this rank
            yield seq, batch
            seq += world_size

    def ready(self, pass_: int, seq: int) -> bool:
        """Whether batch ``(pass_, seq)`` is in the window now (reading it would not wait)."""
        with self._cond:
            return (pass_, seq) in self._batches

    def _next_batch(self, pass_: int, seq: int) -> pa.RecordBatch | None:
        """Batch ``(pass_, seq)`` once produced, or None if the pass ends before it."""
        with self._cond:
            self._wait(
                lambda: (
                    (pass_, seq) in self._batches
                    or (pass_ in self._ends and seq >= self._ends[pass_])
                )
            )
            return self._batches.get((pass_, seq))
