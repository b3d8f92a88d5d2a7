"""The demo's wait for its teacher process: patient while it reports progress, fast when
it dies, bounded when it stalls. Real child processes."""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from multiprocessing.connection import Connection

import pytest

import kdserve as kd
from kdserve.demo import await_child


def slow_but_alive(conn: Connection) -> None:
    for step in ("importing PyTorch", "training the MLP teacher"):
        conn.send({"status": step})
        time.sleep(1.5)  # longer than the stall limit below, but it reports progress
    conn.send({"address": "127.0.0.1:1"})


def dies(conn: Connection) -> None:
    conn.send({"status": "importing PyTorch"})
    sys.exit(3)


def stalls(conn: Connection) -> None:
    conn.send({"status": "training the MLP teacher"})
    time.sleep(30)


def _start(target):  # type: ignore[no-untyped-def]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=target, args=(child,), daemon=True)
    process.start()
    return parent, process


def test_a_slow_child_that_reports_progress_is_waited_for(capsys):
    parent, process = _start(slow_but_alive)
    assert await_child(parent, process, "teacher", stall=2.5) == {"address": "127.0.0.1:1"}
    assert "teacher: training the MLP teacher" in capsys.readouterr().err
    process.join(10)


def test_a_child_that_dies_fails_fast_with_what_it_was_doing():
    parent, process = _start(dies)
    started = time.monotonic()
    with pytest.raises(kd.TeacherUnavailableError, match=r"exited \(code 3\) while importing"):
        await_child(parent, process, "teacher", stall=60)
    assert time.monotonic() - started < 30


def test_a_child_that_stops_progressing_is_given_up_on():
    parent, process = _start(stalls)
    with pytest.raises(kd.TeacherUnavailableError, match="not progressed for 2 s"):
        await_child(parent, process, "teacher", stall=2)
    process.kill()
    process.join(10)
