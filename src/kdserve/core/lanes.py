"""Lanes: threads that each run the calls submitted to them, one at a time and in order.

A teacher's program runs on lanes so that the thread which reads and prepares the next
batch never stands between two calls: with a call queued behind the one running, a lane
starts the next batch the moment one ends, instead of waiting for another thread to wake
and hand it over (on a GIL-bound host that hand-over costs more than the call's own
Python). A lane is also a stable thread for state a framework keeps per thread (PyTorch's
cuDNN autotuning, cuBLAS handles), whichever thread submits.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["Lanes"]

T = TypeVar("T")


class Lanes:
    """``n`` lanes named ``<name><i>``. :meth:`submit` queues ``fn(lane, *args)`` on the
    lane with the fewest calls queued or running (round-robin among equals) and returns
    its Future at once. A lane's thread starts with its first call and ends after
    :meth:`stop`, once the calls queued before it have run."""

    def __init__(self, n: int, name: str) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"lanes need n >= 1, got {n!r}")
        self.name = name
        self._turn = itertools.count()
        self.pending = [0] * n  # calls queued or running, per lane
        self.reset()

    def __len__(self) -> int:
        return len(self.pending)

    def reset(self) -> None:
        """No call queued or running, no thread, new locks: at the start, and in a forked
        child (fork copies no thread, and a lock a parent's thread held stays held)."""
        n = len(self.pending)
        self.pending = [0] * n
        self._queues: list[queue.SimpleQueue[Any] | None] = [None] * n  # None: no thread
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue ``fn(lane, *args)``; its Future. A call cancelled before it starts never
        runs; its exception is raised by ``future.result()``."""
        future: Future[T] = Future()
        n = len(self.pending)
        with self._lock:
            start = next(self._turn) % n
            lane = min(((start + k) % n for k in range(n)), key=self.pending.__getitem__)
            self.pending[lane] += 1
            calls = self._queues[lane]
            if calls is None:
                calls = self._queues[lane] = queue.SimpleQueue()
                thread = threading.Thread(
                    target=self._serve, args=(lane, calls), name=f"{self.name}{lane}", daemon=True
                )
                thread.start()
            calls.put((future, fn, args))
        return future

    def stop(self) -> None:
        """Let every lane's thread end once the calls queued so far have run (a later
        :meth:`submit` starts a new one)."""
        with self._lock:
            for lane, calls in enumerate(self._queues):
                if calls is not None:
                    calls.put(None)
                    self._queues[lane] = None

    def _serve(self, lane: int, calls: queue.SimpleQueue[Any]) -> None:
        """A lane's loop: run each call in turn; None ends it."""
        while (item := calls.get()) is not None:
            self._run(lane, *item)
            del item  # hold nothing of a finished call while waiting for the next

    def _run(self, lane: int, future: Future[Any], fn: Callable[..., Any], args: Any) -> None:
        """One call, unless it was cancelled. It is counted done before its Future is
        set, so a caller the Future wakes sees this lane free."""
        if not future.set_running_or_notify_cancel():
            self._done(lane)
            return
        try:
            result = fn(lane, *args)
        except BaseException as exc:  # raised again by future.result()
            self._done(lane)
            future.set_exception(exc)
        else:
            self._done(lane)
            future.set_result(result)

    def _done(self, lane: int) -> None:
        with self._lock:
            self.pending[lane] -= 1
