"""Bounded waits: every blocking wait in kdserve is a loop of short slices, so that a stop
signal or a deadline is noticed within ``POLL`` seconds and no wait can hang."""

from __future__ import annotations

import time
from collections.abc import Iterator

__all__ = ["POLL", "backoff", "seconds", "slices"]

POLL = 0.1  # seconds: how soon a waiting thread notices a stop signal


def seconds(name: str, value: object) -> float:
    """``value`` as a timeout of seconds > 0; TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
    return float(value)


def slices(timeout: float | None, step: float = POLL) -> Iterator[float]:
    """Wait times of at most ``step`` seconds that end when ``timeout`` seconds have passed
    (None: never). A waiter waits one slice, checks its condition and stop signal, and
    goes on; when the generator ends, the deadline has passed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = step if deadline is None else min(step, deadline - time.monotonic())
        if left <= 0:
            return
        yield left


def backoff(deadline: float, first: float = 0.05, most: float = 2.0) -> Iterator[float]:
    """Retry delays that double from ``first`` up to ``most`` seconds, for as long as the
    next one ends before ``deadline`` (a ``time.monotonic()`` value); then it ends."""
    delay = first
    while time.monotonic() + delay <= deadline:
        yield delay
        delay = min(delay * 2, most)
