"""core.Lanes: threads that run the calls submitted to them one at a time, in order, on
the lane with the fewest calls; queued calls can be cancelled; threads end on stop and
are made anew after it (or in a forked child). Every wait is bounded."""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import pytest

from _helpers import wait_for
from kdserve.core.lanes import Lanes

WAIT = 10.0


def lane_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(name) and t.is_alive()]


def test_calls_run_in_order_on_one_thread_per_lane_and_get_their_lane():
    lanes = Lanes(2, "test-order")
    ran: list[tuple[int, int, str]] = []

    def call(lane: int, i: int) -> int:
        time.sleep(0.01)
        ran.append((lane, i, threading.current_thread().name))
        return i * i

    futures = [lanes.submit(call, i) for i in range(10)]
    assert [f.result(WAIT) for f in futures] == [i * i for i in range(10)]
    assert sorted({(lane, name) for lane, _, name in ran}) == [
        (0, "test-order0"),
        (1, "test-order1"),
    ]
    for lane in (0, 1):  # each lane ran its share in the order submitted
        mine = [i for ln, i, _ in ran if ln == lane]
        assert mine == sorted(mine) and len(mine) == 5
    assert lanes.pending == [0, 0]
    lanes.stop()
    wait_for(lambda: not lane_threads("test-order"), WAIT, "the lanes' threads to end")


def test_a_call_goes_to_the_lane_with_the_fewest_calls():
    lanes = Lanes(3, "test-fewest")
    gate = threading.Event()
    held = [lanes.submit(lambda lane: gate.wait(WAIT) and lane) for _ in range(3)]
    assert lanes.pending == [1, 1, 1]
    extra = [lanes.submit(lambda lane: lane) for _ in range(3)]
    assert lanes.pending == [2, 2, 2]  # round-robin among equals: one behind each
    gate.set()
    assert sorted(f.result(WAIT) for f in held) == [0, 1, 2]
    assert sorted(f.result(WAIT) for f in extra) == [0, 1, 2]
    wait_for(lambda: lanes.pending == [0, 0, 0], WAIT, "every call to be counted done")
    lanes.stop()


def test_a_queued_call_cancelled_never_runs_and_errors_reach_the_future():
    lanes = Lanes(1, "test-cancel")
    gate, ran = threading.Event(), []
    running = lanes.submit(lambda lane: gate.wait(WAIT))
    queued = lanes.submit(lambda lane: ran.append("queued"))
    failing = lanes.submit(lambda lane: 1 / 0)
    wait_for(running.running, WAIT, "the first call to start")
    assert not running.cancel() and queued.cancel()
    gate.set()
    assert running.result(WAIT) is True
    assert isinstance(failing.exception(WAIT), ZeroDivisionError)
    assert ran == [] and queued.cancelled()
    wait_for(lambda: lanes.pending == [0], WAIT, "the cancelled call to be counted done")
    lanes.stop()


def test_stop_lets_queued_calls_run_and_a_later_call_starts_a_new_thread():
    lanes = Lanes(1, "test-stop")
    first = lanes.submit(lambda lane: time.sleep(0.1) or "ran")
    lanes.stop()
    assert first.result(WAIT) == "ran"  # queued before the stop: it ran
    wait_for(lambda: not lane_threads("test-stop"), WAIT, "the lane's thread to end")
    again = lanes.submit(lambda lane: "ran again")
    assert again.result(WAIT) == "ran again"  # on a new thread (the old one is gone)
    assert len(lane_threads("test-stop")) == 1
    lanes.stop()
    wait_for(lambda: not lane_threads("test-stop"), WAIT, "the new thread to end")


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "2"])
def test_a_lane_count_that_is_not_a_positive_int_is_refused(n: Any):
    with pytest.raises(ValueError, match="lanes need n >= 1"):
        Lanes(n, "test-bad")


_FORKED: dict[str, Lanes] = {}  # what the forked child uses (fork copies it)


def _square_in_child(conn: Any) -> None:
    lanes = _FORKED["lanes"]
    lanes.reset()  # what an owner's at-fork hook does (teacher_program registers one)
    conn.send(lanes.submit(lambda lane, x: x * x, 7).result(WAIT))


def test_a_forked_child_that_resets_gets_threads_and_locks_of_its_own():
    lanes = Lanes(1, "test-fork")
    assert lanes.submit(lambda lane: 1).result(WAIT) == 1  # the parent's thread exists
    _FORKED["lanes"] = lanes
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    with lanes._lock:  # held by a parent's thread at the fork
        child = ctx.Process(target=_square_in_child, args=(theirs,))
        child.start()
    try:
        assert mine.poll(30), "the forked child's call never returned"
        assert mine.recv() == 49
    finally:
        child.join(WAIT)
        if child.is_alive():
            child.kill()
    lanes.stop()
