"""core.wait.slices: the one bounded-wait loop."""

import time

from kdserve.core.wait import POLL, backoff, slices


def test_slices_add_up_to_the_timeout_and_stop() -> None:
    start = time.monotonic()
    waited = 0.0
    for step in slices(0.35):
        assert 0 < step <= POLL
        time.sleep(step)
        waited += step
    elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 1.0
    assert waited <= 0.35 + 1e-6


def test_no_timeout_never_ends_by_itself() -> None:
    steps = slices(None, step=0.01)
    assert [next(steps) for _ in range(50)] == [0.01] * 50


def test_zero_timeout_gives_no_slice() -> None:
    assert list(slices(0)) == []


def test_backoff_doubles_up_to_most_and_ends_before_the_deadline() -> None:
    start = time.monotonic()
    delays = []
    for delay in backoff(start + 1.0, first=0.05, most=0.2):
        delays.append(delay)
        time.sleep(delay)  # the caller's retry waits
    assert delays[:3] == [0.05, 0.1, 0.2]
    assert set(delays[2:]) == {0.2}
    assert time.monotonic() - start <= 1.0 + 0.1  # no retry wait ends past the deadline
    assert list(backoff(time.monotonic() - 1)) == []
