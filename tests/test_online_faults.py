"""Online mode under faults, with real teacher processes and real sockets on 127.0.0.1.

A teacher subprocess (_helpers.EXACT_TEACHER) serves a deterministic dataset: sample i is
``x = i * WIDTH + arange(WIDTH)`` (exact in float32) and the program computes
``logits = x * 0.5 - 3`` (exact too), so every value a student receives can be checked
exactly from its sample id. The tests SIGKILL teachers mid-pass and restart them on the
same port, kill them for good, start them after their student, cut their connections
through a TCP proxy, and check that no sample is lost or repeated, that a teacher which
does not come back is reported within ``connect_timeout``, and that nothing is left
running. Every wait is bounded: a hang fails the test instead of blocking the run.
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kdserve as kd
from _helpers import (
    EXACT_TEACHER,
    STARTUP,
    Background,
    ScriptProc,
    Scripts,
    free_port,
    wait_for,
)

TOKEN = "online-faults-token"
WIDTH = 4
BATCH = 10  # the teacher's batch size; its program is called once per batch
STUDENT_BATCH = 32
STUDENT_BUF = 2  # merged batches a student prefetches
TEACHER_BUF = 4  # the teacher's buf_size: batches in its replay window per rank
# A student's consumer is never more than this many samples behind what the teacher has
# sent it: its prefetch queue (STUDENT_BUF + 1 batches of STUDENT_BATCH), the re-batcher
# (< STUDENT_BATCH) and the teacher's window (TEACHER_BUF batches of BATCH per rank),
# with room to spare. A consumer between 0 and (its share of a pass) - AHEAD samples
# into a pass means the teacher is in the middle of streaming that pass.
AHEAD = 300

# -- helpers ------------------------------------------------------------------------


def log_lines(path: Path) -> list[int]:
    """The sample ids a teacher incarnation logged (complete lines only)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [int(line) for line in text[: text.rfind("\n") + 1].split()]


class TeacherProc(ScriptProc):
    """One teacher process (EXACT_TEACHER); it logs its batches to the file ``log``."""

    def __init__(self, script: Path, cfg: dict[str, Any], tag: str) -> None:
        self.log = script.parent / f"{tag}.log"
        super().__init__(script, {**cfg, "log": str(self.log)}, tag)


class Teachers:
    """Starts teacher processes; the ``scripts`` fixture kills and reaps them at teardown."""

    def __init__(self, scripts: Scripts) -> None:
        self.scripts = scripts
        self.procs: list[TeacherProc] = []

    def start(self, port: int = 0, **cfg: Any) -> TeacherProc:
        base = {"name": "ft", "width": WIDTH, "batch": BATCH, "buf": TEACHER_BUF, "token": TOKEN}
        proc = self.scripts.start(TeacherProc, EXACT_TEACHER, {**base, **cfg, "port": port})
        self.procs.append(proc)
        return proc


@pytest.fixture
def teachers(scripts: Scripts) -> Teachers:
    return Teachers(scripts)


def make_student(
    port: int, *, connect_timeout: float, name: str = "ft", rank: int = 0, world_size: int = 1
) -> kd.Student:
    student = kd.Student(
        token=TOKEN,
        connect_timeout=connect_timeout,
        rank=rank,
        world_size=world_size,
        buf_size=STUDENT_BUF,
    )
    student.register_teacher(in_address=f"127.0.0.1:{port}", name=name)
    return student


def check_batch(batch: dict[str, Any]) -> list[int]:
    """The batch's sample ids, after checking its knowledge is exactly the program's."""
    assert set(batch) == {kd.SAMPLE_ID, "logits"}
    ids = batch[kd.SAMPLE_ID]
    x = (ids[:, None] * WIDTH + np.arange(WIDTH)).astype(np.float32)
    assert batch["logits"].dtype == np.float32
    np.testing.assert_array_equal(batch["logits"], x * np.float32(0.5) - np.float32(3))
    return [int(i) for i in ids]


def read_pass(gen: Callable[[], Iterator[dict[str, Any]]]) -> list[int]:
    ids: list[int] = []
    for batch in gen():
        ids += check_batch(batch)
    return ids


def rank_ids(n: int, rank: int, world_size: int) -> list[int]:
    """The sample ids rank ``rank`` gets in a pass: those of the batches it owns, in order."""
    return [i for i in range(n) if (i // BATCH) % world_size == rank]


# -- a teacher killed and restarted, again and again --------------------------------


class Progress:
    """Where the consumers stand: for each rank, its pass and the samples it has of it."""

    def __init__(self, ranks: int = 1) -> None:
        self._lock = threading.Lock()
        self._at = [(0, 0)] * ranks

    def update(self, rank: int, pass_: int, consumed: int) -> None:
        with self._lock:
            self._at[rank] = (pass_, consumed)

    def slowest(self) -> tuple[int, int]:
        with self._lock:
            return min(self._at)


def consume_passes(
    student: kd.Student, times: int, progress: Progress, rank: int, done: threading.Event
) -> list[list[int]]:
    """Read ``times`` passes, checking every batch, reporting progress as it goes."""
    gen = student.get_knowledge_generator(STUDENT_BATCH)
    passes = []
    try:
        for p in range(times):
            progress.update(rank, p, 0)
            ids: list[int] = []
            for batch in gen():
                ids += check_batch(batch)
                progress.update(rank, p, len(ids))
            passes.append(ids)
        return passes
    finally:
        done.set()


class KillLoop:
    """SIGKILLs the teacher at random moments and restarts it on the same port."""

    def __init__(
        self,
        teachers: Teachers,
        first: TeacherProc,
        progress: Progress,
        cfg: dict[str, Any],
        world_size: int = 1,
    ) -> None:
        self.teachers, self.current, self.port = teachers, first, first.wait_serving()
        self.progress, self.cfg = progress, cfg
        self.share = cfg["n"] // world_size  # the samples of a pass each rank gets
        self.stop = threading.Event()
        # (pass, samples of it consumed) of the slowest rank at each kill
        self.kills: list[tuple[int, int]] = []
        self.rng = random.Random(20240531)

    def run(self, kills: int) -> None:
        times = self.cfg["times"]
        per_pass = -(-kills // times)  # spread the kills over every pass
        while len(self.kills) < kills:
            # Let this incarnation serve: it logs the batch that gives the schema, then
            # the batches its students still need.
            log = self.current.log
            wait_for(lambda log=log: len(log_lines(log)) >= 2, STARTUP, "a served batch")
            if self.stop.wait(self.rng.uniform(0.05, 0.6)):  # a random point in the pass
                return
            pass_, consumed = self.progress.slowest()
            if pass_ == times - 1 and consumed >= self.share - AHEAD:
                return  # the teacher may have finished: a new one would wait forever
            if sum(p == pass_ for p, _ in self.kills) >= per_pass:
                wait_for(
                    lambda p=pass_: self.stop.is_set() or self.progress.slowest()[0] > p,
                    60,
                    "the next pass",
                )
                continue
            self.current.kill()
            self.kills.append((pass_, consumed))
            self.current = self.teachers.start(self.port, **self.cfg)

    def mid_pass(self) -> list[tuple[int, int]]:
        """The kills that landed while every rank was inside a pass, far from its end."""
        return [k for k in self.kills if 0 < k[1] < self.share - AHEAD]


def test_teacher_killed_and_restarted_mid_pass_loses_and_repeats_nothing(
    teachers: Teachers,
) -> None:
    n, times = 3000, 3
    cfg = {"n": n, "sleep": 0.01, "times": times}
    first = teachers.start(**cfg)
    student = make_student(first.wait_serving(), connect_timeout=20.0)
    Background(student.start).result(timeout=STARTUP)
    progress = Progress()
    loop = KillLoop(teachers, first, progress, cfg)
    consumer = Background(lambda: consume_passes(student, times, progress, 0, loop.stop))
    killer = Background(lambda: loop.run(kills=12))
    try:
        passes = consumer.result(timeout=120)
    finally:
        loop.stop.set()
    killer.result(timeout=STARTUP + 5)

    assert len(passes) == times
    for p, ids in enumerate(passes):
        assert len(ids) == n, f"pass {p}: {len(ids)} samples, {len(set(ids))} distinct"
        assert ids == list(range(n)), f"pass {p}: samples lost, repeated or out of order"
    kills, mid_pass = loop.kills, loop.mid_pass()
    assert len(kills) >= 10, f"only {len(kills)} kills happened: {kills}"
    assert len(mid_pass) > len(kills) // 2, f"most kills must land mid-pass: {kills}"
    assert {p for p, _ in mid_pass} == set(range(times)), f"kills must hit every pass: {kills}"
    # A restarted teacher regenerates only the batches its student still needs: each
    # kill costs the batch that gives the schema plus those the dead one had computed
    # ahead (at most AHEAD samples), not a pass.
    computed = sum(len(log_lines(t.log)) for t in teachers.procs)
    per_kill = 1 + AHEAD // BATCH
    assert computed <= times * n // BATCH + len(kills) * per_kill, (computed, kills)
    loop.current.finish()


def test_two_ranks_lose_and_repeat_nothing_across_teacher_restarts(teachers: Teachers) -> None:
    n, times, world = 3000, 2, 2
    cfg = {"n": n, "sleep": 0.01, "times": times}
    first = teachers.start(**cfg)
    port = first.wait_serving()
    students = [
        make_student(port, connect_timeout=20.0, rank=r, world_size=world) for r in range(world)
    ]
    for s in students:
        Background(s.start).result(timeout=STARTUP)
    progress = Progress(world)
    loop = KillLoop(teachers, first, progress, cfg, world)
    consumers = [
        Background(lambda r=r: consume_passes(students[r], times, progress, r, loop.stop))
        for r in range(world)
    ]
    killer = Background(lambda: loop.run(kills=6))
    try:
        got = [c.result(timeout=120) for c in consumers]
    finally:
        loop.stop.set()
    killer.result(timeout=STARTUP + 5)

    for p in range(times):
        for r in range(world):
            assert got[r][p] == rank_ids(n, r, world), f"rank {r}, pass {p}"
    kills, mid_pass = loop.kills, loop.mid_pass()
    assert len(kills) >= 4, f"only {len(kills)} kills happened: {kills}"
    assert len(mid_pass) > len(kills) // 2, f"most kills must land mid-pass: {kills}"
    assert {p for p, _ in mid_pass} == set(range(times)), f"kills must hit every pass: {kills}"
    loop.current.finish()


# -- a teacher that never comes back --------------------------------------------------


def test_teacher_killed_for_good_raises_unavailable_within_connect_timeout(
    teachers: Teachers,
) -> None:
    n, connect_timeout = 3000, 3.0
    teacher = teachers.start(n=n, sleep=0.01, times=1)
    port = teacher.wait_serving()
    student = make_student(port, connect_timeout=connect_timeout, name="gone")
    Background(student.start).result(timeout=STARTUP)
    gen = student.get_knowledge_generator(STUDENT_BATCH)
    got: list[int] = []
    first = threading.Event()
    raised_at: list[float] = []

    def consume() -> None:
        try:
            for batch in gen():
                got.extend(check_batch(batch))
                first.set()
        except kd.TeacherUnavailableError:
            raised_at.append(time.monotonic())
            raise

    consumer = Background(consume)
    assert first.wait(STARTUP), "no knowledge arrived"
    killed_at = time.monotonic()
    teacher.kill()
    with pytest.raises(kd.TeacherUnavailableError) as failure:
        consumer.result(timeout=connect_timeout + 15)
    elapsed = raised_at[0] - killed_at
    # It retried (it did not give up at once) and gave up about connect_timeout later.
    assert connect_timeout / 2 <= elapsed <= connect_timeout + 4, elapsed
    assert failure.value.teacher == "gone"
    assert "'gone'" in str(failure.value)
    assert 0 < len(got) < n, "the kill must land mid-pass"
    assert got == list(range(len(got))), "what arrived before the kill must be exact"


def test_another_teacher_restarted_on_the_address_is_refused_not_mixed_in(
    teachers: Teachers,
) -> None:
    """A teacher killed mid-pass whose address another teacher then takes: the student
    refuses to resume the pass from it (its knowledge would mix into the pass)."""
    n = 3000
    teacher = teachers.start(n=n, sleep=0.01, times=1)
    port = teacher.wait_serving()
    student = make_student(port, connect_timeout=20.0, name="ft")
    Background(student.start).result(timeout=STARTUP)
    got: list[int] = []
    first = threading.Event()

    def consume() -> None:
        for batch in student.get_knowledge_generator(STUDENT_BATCH)():
            got.extend(check_batch(batch))
            first.set()

    consumer = Background(consume)
    assert first.wait(STARTUP), "no knowledge arrived"
    teacher.kill()
    teachers.start(port, n=n, sleep=0.01, times=1, name="impostor").wait_serving()
    with pytest.raises(kd.KdserveError, match=r"another answers there now \(name 'ft' -> 'imp"):
        consumer.result(timeout=STARTUP + 20)
    assert 0 < len(got) < n and got == list(range(len(got)))  # nothing of the other's


# -- teacher and student starting in either order ------------------------------------


def test_student_started_before_its_teacher_connects_when_it_comes(
    teachers: Teachers,
) -> None:
    n, times = 500, 2
    port = free_port()
    student = make_student(port, connect_timeout=30.0)
    starting = Background(student.start)
    # No teacher yet: start() keeps retrying instead of returning or failing.
    assert not starting.done.wait(1.0), "start() ended with no teacher running"
    teacher = teachers.start(port, n=n, sleep=0.0, times=times)
    starting.result(timeout=STARTUP + 30)
    gen = student.get_knowledge_generator(STUDENT_BATCH)
    for p in range(times):
        ids = Background(lambda: read_pass(gen)).result(timeout=30)
        assert ids == list(range(n)), f"pass {p}"
    assert teacher.finish()["delivered"] == n * times


def test_start_without_any_teacher_raises_unavailable_within_connect_timeout() -> None:
    connect_timeout = 2.0
    port = free_port()  # nothing listens there
    student = make_student(port, connect_timeout=connect_timeout, name="nobody")
    began = time.monotonic()
    with pytest.raises(kd.TeacherUnavailableError) as failure:
        Background(student.start).result(timeout=connect_timeout + 15)
    elapsed = time.monotonic() - began
    assert connect_timeout / 2 <= elapsed <= connect_timeout + 3, elapsed
    assert failure.value.teacher == "nobody"
    assert f"127.0.0.1:{port}" in str(failure.value)


# -- connections cut while the teacher lives on --------------------------------------


class Proxy:
    """A TCP proxy on 127.0.0.1 to ``target``; ``cut()`` breaks every live connection."""

    def __init__(self, target: int) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._live: list[tuple[socket.socket, socket.socket]] = []  # (student, teacher)
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.accepted = 0
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            pair = (client, upstream)
            for s in pair:  # forward small gRPC frames at once, as gRPC itself does
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.accepted += 1
                self._live.append(pair)
                for src, dst in (pair, pair[::-1]):
                    pump = threading.Thread(target=self._pump, args=(src, dst, pair), daemon=True)
                    pump.start()
                    self._threads.append(pump)

    def _pump(
        self, src: socket.socket, dst: socket.socket, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass  # cut
        finally:
            with self._lock:
                if pair in self._live:
                    self._live.remove(pair)
            _close(pair)

    def cut(self) -> int:
        """Break every live connection; return how many there were."""
        with self._lock:
            live, self._live = self._live, []
        for pair in live:
            _close(pair)
        return len(live)

    def close(self) -> None:
        self._stop.set()
        self._accepter.join(timeout=5)
        self._listener.close()
        self.cut()
        for pump in self._threads:
            pump.join(timeout=5)


def _close(pair: tuple[socket.socket, socket.socket]) -> None:
    for s in pair:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked in recv()
        s.close()


def test_cut_connections_resume_from_the_replay_window(teachers: Teachers) -> None:
    n, times, spacing = 3000, 2, 500
    assert spacing > AHEAD  # so every cut finds the connection the previous one forced
    teacher = teachers.start(n=n, sleep=0.005, times=times)
    proxy = Proxy(teacher.wait_serving())
    try:
        student = make_student(proxy.port, connect_timeout=20.0)
        Background(student.start).result(timeout=STARTUP)
        gen = student.get_knowledge_generator(STUDENT_BATCH)
        rng = random.Random(7)
        cuts: list[int] = []  # live connections each cut broke

        def consume() -> list[list[int]]:
            passes = []
            for _ in range(times):
                at = iter(range(100 + rng.randrange(100), n - AHEAD, spacing))
                next_cut = next(at, n + 1)
                ids: list[int] = []
                for batch in gen():
                    ids += check_batch(batch)
                    if len(ids) >= next_cut:
                        cuts.append(proxy.cut())
                        next_cut = next(at, n + 1)
                passes.append(ids)
            return passes

        passes = Background(consume).result(timeout=60)
        for p, ids in enumerate(passes):
            assert ids == list(range(n)), f"pass {p}: samples lost, repeated or out of order"
        assert len(cuts) >= 8 and all(c >= 1 for c in cuts), cuts
        # The first connection, and one after every cut but perhaps the last (the student
        # may have had everything, its last acknowledgement included, before it).
        assert proxy.accepted >= len(cuts), "the student must reconnect after each cut"
        # The teacher never restarted: it computed every batch exactly once per pass, and
        # what the student asked for again came from its replay window.
        assert log_lines(teacher.log) == list(range(0, n, BATCH)) * times
        assert teacher.finish()["delivered"] == n * times
    finally:
        teacher.kill()
        proxy.close()


# -- how the service ends -------------------------------------------------------------


def test_teacher_returns_once_every_rank_has_the_last_pass(teachers: Teachers) -> None:
    n, times, world = 200, 2, 2
    # The window holds buf_size batches per rank: enough for rank 1's share of a pass
    # to wait there while rank 0 reads the last pass alone.
    teacher = teachers.start(n=n, sleep=0.0, times=times, buf=n // BATCH)
    port = teacher.wait_serving()
    students = [
        make_student(port, connect_timeout=20.0, rank=r, world_size=world) for r in range(world)
    ]
    gens = []
    for s in students:
        Background(s.start).result(timeout=STARTUP)
        gens.append(s.get_knowledge_generator(STUDENT_BATCH))

    first = [Background(lambda g=g: read_pass(g)) for g in gens]  # pass 0, ranks together
    got = [[w.result(timeout=30)] for w in first]
    got[0].append(Background(lambda: read_pass(gens[0])).result(timeout=30))
    # Rank 0 has the last pass, rank 1 not yet: the teacher must still be serving.
    with pytest.raises(subprocess.TimeoutExpired):
        teacher.proc.wait(timeout=0.5)
    got[1].append(Background(lambda: read_pass(gens[1])).result(timeout=30))
    assert teacher.finish()["delivered"] == n * times

    for p in range(times):
        for r in range(world):
            assert got[r][p] == rank_ids(n, r, world), f"rank {r}, pass {p}"
        assert sorted(got[0][p] + got[1][p]) == list(range(n))


def test_student_stopping_early_stops_its_thread_and_can_go_on(teachers: Teachers) -> None:
    n, times = 3000, 2
    teacher = teachers.start(n=n, sleep=0.005, times=times)
    port = teacher.wait_serving()
    student = make_student(port, connect_timeout=20.0)
    Background(student.start).result(timeout=STARTUP)
    gen = student.get_knowledge_generator(STUDENT_BATCH)
    before = set(threading.enumerate())

    def ours() -> list[threading.Thread]:
        return [
            t
            for t in threading.enumerate()
            if t not in before and t.name == "kdserve-student" and t.is_alive()
        ]

    def read_some() -> tuple[list[int], int]:
        ids: list[int] = []
        running = 0
        for batch in gen():
            ids += check_batch(batch)
            running = len(ours())
            if len(ids) >= 5 * STUDENT_BATCH:
                break
        return ids, running

    ids, running = Background(read_some).result(timeout=30)
    assert ids == list(range(5 * STUDENT_BATCH))
    assert running == 1, "the student reads in one background thread"
    wait_for(lambda: not ours(), 10, "the student's background thread to stop")
    # The rest of pass 0 is skipped; the next pass comes whole and the teacher ends.
    assert Background(lambda: read_pass(gen)).result(timeout=30) == list(range(n))
    teacher.finish()
