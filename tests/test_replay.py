"""ReplayWindow: batches kept until their rank has them, backpressure, passes, resume points
after a restart, and every wait bounded and woken by stop(). Real threads; no sleeps
longer than a check needs."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pyarrow as pa
import pytest

import kdserve as kd
from _helpers import Background
from kdserve.online.replay import ReplayWindow, WindowStoppedError

JOIN = 5.0  # seconds a thread gets to finish
BLOCKED = 0.2  # seconds after which a waiting thread is taken to be blocked


def batch(rows: int = 2) -> pa.RecordBatch:
    return pa.record_batch([pa.array(range(rows))], names=["v"])


@pytest.fixture
def window() -> Iterator[ReplayWindow]:
    w = ReplayWindow(times=2, buf_size=2, min_bytes=0)
    yield w
    w.stop()  # no test leaves a thread waiting on it


def test_a_batch_stays_until_its_rank_acknowledges_it(window):
    window.ack(0, 1, (0, 0))  # a student asks: the producer learns the group's size
    stream = window.stream(0, 0, 0, 1)
    window.put((0, 0), batch())
    assert next(stream)[0] == 0
    window.put((0, 1), batch())
    assert window.ready(0, 0) and window.ready(0, 1)  # read, not acknowledged: kept
    window.ack(0, 1, (0, 1))
    assert not window.ready(0, 0) and window.ready(0, 1)
    assert not window.needed((0, 0)) and window.needed((0, 1))
    window.put((0, 0), batch())  # regenerated after a restart of the producer: not kept
    assert not window.ready(0, 0)


def test_the_producer_blocks_while_the_window_is_full(window):
    window.ack(0, 1, (0, 0))
    window.put((0, 0), batch())
    window.put((0, 1), batch())
    third = Background(lambda: window.put((0, 2), batch()))
    assert third.blocked(BLOCKED), "a third batch went into a window of buf_size 2"
    window.ack(0, 1, (0, 1))  # frees batch 0
    third.result(JOIN)
    assert window.ready(0, 2)


def test_small_batches_fill_the_window_up_to_min_bytes():
    w = ReplayWindow(times=1, buf_size=1, min_bytes=10 * batch().nbytes)
    w.ack(0, 1, (0, 0))
    for seq in range(5):  # over buf_size, under min_bytes: no wait
        w.put((0, seq), batch())
    assert all(w.ready(0, seq) for seq in range(5))


def test_a_pass_ends_for_each_rank_with_its_share_of_rows():
    window = ReplayWindow(times=1, buf_size=8, min_bytes=0)  # room for the whole pass
    rows = [3, 1, 4, 1, 5]
    for seq, n in enumerate(rows):
        window.count_rows((0, seq), n)
    assert window.rank_rows(0, 2, timeout=0.05) is None  # the pass is not over yet
    window.ack(0, 2, (0, 0))
    window.ack(1, 2, (0, 1))
    ranks = [Background(lambda r=r: list(window.stream(0, r, r, 2))) for r in (0, 1)]
    for seq, n in enumerate(rows):
        window.put((0, seq), batch(n))
    window.end_pass(0, len(rows))
    got = [[(s, b.num_rows) for s, b in rank.result(JOIN)] for rank in ranks]
    assert got == [[(0, 3), (2, 4), (4, 5)], [(1, 1), (3, 1)]]
    assert window.rank_rows(0, 2, timeout=0.0) == [12, 2]


def test_acks_through_the_last_pass_drain_the_window(window):
    assert not window.wait_drained(timeout=0.05)
    drained = Background(lambda: window.wait_drained(timeout=JOIN))
    window.ack(0, 2, (2, 0))
    assert drained.blocked(BLOCKED)  # rank 1 is not through yet
    window.ack(1, 2, (2, 1))
    assert drained.result(JOIN) is True


def test_a_restarted_teacher_learns_where_each_rank_stands(window):
    # A fresh window (the teacher was restarted): rank 0 had batches up to 4 of pass 1,
    # rank 1 acknowledges up to batch 5 of pass 0.
    window.ack(0, 2, (1, 4))
    window.ack(1, 2, (0, 5))
    assert window.needed((1, 4)) and not window.needed((1, 2))  # rank 0's
    assert window.needed((0, 5)) and not window.needed((0, 3))  # rank 1's
    assert window.pass_needed(0)  # rank 1 is still in pass 0
    window.ack(1, 2, (1, 1))
    assert not window.pass_needed(0) and window.pass_needed(1)
    window.put((1, 2), batch())  # acknowledged by rank 0's request: not kept
    assert not window.ready(1, 2)
    waiting = Background(lambda: next(window.stream(1, 4, 0, 2)))
    window.put((1, 4), batch())
    assert waiting.result(JOIN)[0] == 4


def test_stop_wakes_every_waiter_with_its_reason(window):
    full = ReplayWindow(times=1, buf_size=1, min_bytes=0)  # its producer waits for room
    full.ack(0, 1, (0, 0))
    full.put((0, 0), batch())
    empty = ReplayWindow(times=1, buf_size=1, min_bytes=0)  # its student waits for a batch
    empty.ack(0, 1, (0, 0))
    waiters = {
        "producer": Background(lambda: full.put((0, 1), batch())),
        "student": Background(lambda: next(empty.stream(0, 0, 0, 1))),
        "drain": Background(empty.wait_drained),
        "students": Background(lambda: window.wait_for_students(grace=JOIN)),
    }
    assert all(w.blocked(BLOCKED) for w in waiters.values())
    started = time.monotonic()
    for w in (full, empty, window):
        w.stop("the producer failed")
    for name, waiter in waiters.items():
        with pytest.raises(WindowStoppedError, match="the producer failed"):
            waiter.result(JOIN)
        assert time.monotonic() - started < 2.0, name
    with pytest.raises(WindowStoppedError):  # and later waits fail at once
        full.put((0, 1), batch())


def test_wait_for_students_gives_other_ranks_a_grace_period(window):
    waiting = Background(lambda: window.wait_for_students(grace=JOIN))
    assert waiting.blocked(BLOCKED)  # nobody asked yet
    window.ack(0, 3, (0, 0))
    assert waiting.blocked(BLOCKED)  # two of three ranks are unknown
    window.ack(1, 3, (0, 1))
    window.ack(2, 3, (0, 2))
    assert waiting.result(JOIN) == 3  # every rank known: no need to wait out the grace


def test_wait_for_students_goes_on_without_ranks_that_do_not_come(window):
    window.ack(0, 2, (0, 0))
    started = time.monotonic()
    assert window.wait_for_students(grace=0.3) == 2
    assert 0.25 <= time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        (lambda w: next(w.stream(2, 0, 0, 1)), r"pass 2 was asked for.*times=2"),
        (lambda w: next(w.stream(0, 1, 0, 2)), "batch 1 does not belong to rank 0 of 2"),
        (lambda w: w.ack(0, 1, (3, 0)), "this teacher serves 2 pass"),
        (lambda w: w.ack(1, 2, (0, 2)), "batch 2 does not belong to rank 1 of 2"),
        (lambda w: w.ack(0, 3, (0, 0)), "every rank must use the same world_size"),
        (lambda w: next(w.stream(0, 0, 0, 1)), "which it had acknowledged"),
    ],
)
def test_requests_that_do_not_fit_the_window_are_refused(window, call, reason):
    window.ack(0, 1, (0, 2))  # a group of one, past batch 1 of pass 0
    with pytest.raises(kd.ProtocolError, match=reason):
        call(window)
