"""Prefetch: run an iterator in a background thread, ``buf_size`` items ahead of its consumer.

The queue is bounded, so a slow consumer slows the producer instead of growing memory.
An exception in the producer is raised in the consumer; a consumer that stops early
(breaks out of its loop) stops the producer. No wait is unbounded: both sides poll a
stop flag while they wait.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from kdserve.core.wait import POLL
from kdserve.errors import KdserveError

__all__ = ["Prefetcher"]

T = TypeVar("T")
_JOIN_WAIT = 30.0  # seconds close() waits for the producer's thread
_log = logging.getLogger(__name__)
_DONE = object()


class Prefetcher(Generic[T]):
    """Iterate ``produce()`` in a daemon thread; iterate this object to consume it."""

    def __init__(
        self,
        produce: Callable[[], Iterable[T]],
        buf_size: int,
        name: str,
        on_wait: Callable[[float], None] | None = None,
        cancel: Callable[[], None] | None = None,
    ) -> None:
        """``on_wait(seconds)`` is called while the consumer waits, with the seconds it
        has waited for the next item; what it raises is raised in the consumer.
        ``cancel()`` is called by :meth:`close` before it waits for the producer, to end
        a call the producer may be blocked in (e.g. a network read)."""
        if buf_size < 1:
            raise ValueError(f"buf_size must be >= 1, got {buf_size}")
        self._on_wait = on_wait
        self._cancel = cancel
        self._queue: queue.Queue[object] = queue.Queue(maxsize=buf_size)
        self._stop = threading.Event()
        self._ended = 0  # 1 once the end of the stream (or its error) is queued
        self._produce = produce
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        """Whether its consumer may still read it (it was not closed, nor read to its end)."""
        return not self._stop.is_set()

    def qsize(self) -> int:
        """Items produced and not yet consumed (not counting the end of the stream)."""
        return max(0, self._queue.qsize() - self._ended)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=POLL)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        items: Iterator[T] = iter(())
        try:
            items = iter(self._produce())  # a reader that cannot open fails here
            for item in items:
                if not self._put(item):
                    return
            self._ended = int(self._put(_DONE))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._ended = int(self._put(exc))
        finally:
            close = getattr(items, "close", None)  # a generator's cleanup runs now, here
            if close is not None:
                close()

    def __iter__(self) -> Iterator[T]:
        wait = None  # for the producer's thread: close()'s default
        try:
            waiting = time.monotonic()
            while True:
                try:
                    item = self._queue.get(timeout=POLL)
                except queue.Empty:
                    if self._stop.is_set():  # closed by another thread: not the end
                        raise KdserveError(
                            f"{self._thread.name} was closed before the end of its stream "
                            f"(e.g. Student.close() from another thread)"
                        ) from None
                    if not self._thread.is_alive() and self._queue.empty():
                        return
                    if self._on_wait is not None:
                        self._on_wait(time.monotonic() - waiting)
                    continue
                waiting = time.monotonic()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit):  # not the consumer stopping early: an
                wait = 0.0  # error (or Ctrl-C) whose handler closes, and waits, once it acted
            raise
        finally:
            self.close(wait)

    def close(self, wait: float | None = None) -> None:
        """Stop the producer and wait up to ``wait`` s (default 30) for its thread (it
        checks the flag every 0.1 s; one busy in a call, e.g. a hung program, stops after)."""
        wait = _JOIN_WAIT if wait is None else wait
        self._stop.set()
        if self._cancel is not None and not self._ended and self._thread.is_alive():
            self._cancel()  # (not once the stream ended: nothing to cancel)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=wait)
            if self._thread.is_alive() and wait > 0:
                _log.warning(
                    "thread %s did not stop within %g s (its producer is busy); it stops at "
                    "its next item",
                    self._thread.name,
                    wait,
                )
