"""core.wait.slices: the one bounded-wait loop."""

import time

from kdserve.core.wait import POLL, slices


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
