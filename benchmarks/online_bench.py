"""Benchmark of kdserve's online transport (Arrow Flight) against raw TCP and a pickle queue.

A teacher process sends knowledge batches to a student process on 127.0.0.1: float32
logits of shape ``(rows, 1000)`` plus the int64 ``sample_id`` column, in batches of about
1 MB, 6 MB and 32 MB. Five ways are measured in the same run:

* **kdserve Student**: ``Teacher.start_knowledge_service`` on one side (its program
  returns precomputed arrays, so inference costs nothing), ``Student`` +
  ``get_knowledge_generator(batch_size=rows)`` on the other, batch size equal to the
  teacher's so the student does not re-batch: what a user gets;
* **kdserve stream_pass** (diagnostic): the same teacher, read with the lower-level
  ``TeacherClient.stream_pass`` (no merge, no prefetch thread, parts not joined), to
  separate the transport from the student pipeline;
* **pyarrow Flight alone** (diagnostic): a bare ``FlightServerBase`` whose ``do_get``
  streams the same batches cut into the same ``chunk_bytes`` parts, read with
  ``FlightClient.do_get``: what Arrow Flight over gRPC allows without kdserve's teacher
  pipeline, replay window and acknowledgements;
* **raw TCP** (speed-of-transport reference): the same arrays' bytes over a plain socket,
  length-prefixed, ``sendall(memoryview)`` on one side and ``recv_into`` preallocated numpy
  buffers on the other;
* **pickle manager queue** (the older Pantheon toolkit's way): a ``BaseManager`` server
  process holding a ``queue.Queue``; the teacher puts dicts of numpy arrays, the student
  gets them (each batch is pickled twice and unpickled twice on its way).

Each measurement runs in a fresh pair of processes (spawned), which first move one
untimed warm-up pass (imports, allocator pools, connection windows) and then the timed
pass. The student "touches" every batch the same way whatever the method: it sums one
logit per 4 KiB page and every sample id (the id sum also checks that every sample
arrived). Throughput is knowledge bytes (logits + ids, 1 MB = 10**6 bytes) per second of
the student's wall clock, from the start of the timed pass to its last batch. CPU cost is
the user + system CPU time of every process involved (teacher, student, and the pickle
baseline's manager process), each read over the timed pass with ``getrusage`` (the
manager from ``/proc``), divided by the GB moved.

Every measurement is repeated (``--repeats``, default 5) in rotating order; the tables
show medians, min..max, and each method's throughput as a multiple of raw TCP and of the
pickle queue. The teacher's ``chunk_bytes`` (the size of the parts a batch travels in) is
also swept at the largest batch size (for both kdserve paths and bare Flight).

    python benchmarks/online_bench.py            # full run, about 2.5 minutes on 2 cores
    python benchmarks/online_bench.py --quick    # smoke test, well under a minute
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import queue
import resource
import socket
import statistics
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.managers import BaseManager
from typing import Any

import numpy as np
import pyarrow as pa
from pyarrow import flight
from report import fmt

import kdserve as kd
from kdserve.online.client import TeacherClient
from kdserve.online.serve_pass import slice_rows
from kdserve.online.server import DEFAULT_CHUNK_BYTES

MB = 1_000_000
MIB = 1 << 20
WIDTH = 1000  # logits per sample
ROW_BYTES = 4 * WIDTH + 8  # float32 logits + int64 sample id
PAGE = 4096
TOKEN = "online-bench"
TCP_GOAL = 0.8  # kdserve >= 0.8x raw TCP
PICKLE_GOAL = 7.0  # kdserve >= 7x the pickle manager queue
CPU_GOAL = 1.2  # kdserve <= 1.2 CPU-s per GB (teacher + student)
QUEUE_SIZE = 10  # batches the pickle queue holds (kdserve's default buf_size too)
ONE_PART = 1 << 40  # chunk_bytes larger than any batch: one part per batch
TIMEOUT = 300.0  # seconds one measurement may take before it is abandoned

M_STUDENT = "kdserve Student"
M_STREAM = "kdserve stream_pass (diag)"
M_TCP = "raw TCP sendall/recv_into"
M_PICKLE = "pickle manager queue"
M_FLIGHT = "pyarrow Flight alone (diag)"
METHODS = [M_STUDENT, M_STREAM, M_FLIGHT, M_TCP, M_PICKLE]
CHUNKED = (M_STUDENT, M_STREAM, M_FLIGHT)  # methods that send a batch in chunk_bytes parts


@dataclass(frozen=True, kw_only=True)
class Job:
    """One measurement: a method, a batch size and (kdserve) the teacher's chunk_bytes."""

    method: str
    rows: int
    count: int
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    buf_size: int = 10  # the teacher's window, in batches (the library's default)
    pool_mb: float = 64.0
    seed: int = 0

    @property
    def batch_bytes(self) -> int:
        return self.rows * ROW_BYTES

    @property
    def nbytes(self) -> int:
        return self.rows * self.count * ROW_BYTES

    @property
    def parts(self) -> int:
        """Parts per batch on the wire (kdserve's row slices of about ``chunk_bytes``)."""
        if self.chunk_bytes >= self.batch_bytes:
            return 1
        step = max(1, self.rows * self.chunk_bytes // self.batch_bytes)
        return math.ceil(self.rows / step)


@dataclass
class Sample:
    """One measurement's result."""

    seconds: float
    cpu_send: float  # teacher process (+ the pickle manager's process)
    cpu_recv: float  # student process
    nbytes: int
    batches: int

    @property
    def mb_s(self) -> float:
        return self.nbytes / MB / self.seconds

    @property
    def batches_s(self) -> float:
        return self.batches / self.seconds

    @property
    def cpu_gb(self) -> float:
        return (self.cpu_send + self.cpu_recv) / (self.nbytes / 1e9)


# --- shared helpers (run in the child processes) -----------------------------------------


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of another process, from ``/proc/<pid>/stat`` (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_pool(job: Job) -> list[np.ndarray]:
    """Distinct precomputed logits batches (about ``pool_mb`` MB), reused round robin."""
    n = max(2, math.ceil(job.pool_mb * MB / (job.rows * WIDTH * 4)))
    rng = np.random.default_rng(job.seed)
    return [rng.random((job.rows, WIDTH), dtype=np.float32) for _ in range(n)]


def batch_ids(job: Job, i: int) -> np.ndarray:
    """Sample ids of batch ``i`` of a pass."""
    return np.arange(i * job.rows, (i + 1) * job.rows, dtype=np.int64)


def touch(ids: np.ndarray, logits: np.ndarray) -> tuple[int, float]:
    """What every student does with a batch: sum every id and one logit per 4 KiB page."""
    return int(ids.sum()), float(logits.reshape(-1)[:: PAGE // 4].sum())


class Tally:
    """What a student received in one pass, checked against what was sent."""

    def __init__(self) -> None:
        self.rows = 0
        self.batches = 0
        self.id_sum = 0
        self.value = 0.0

    def add(self, ids: np.ndarray, logits: np.ndarray, whole_batch: bool = True) -> None:
        id_sum, value = touch(ids, logits)
        self.rows += len(ids)
        self.batches += whole_batch
        self.id_sum += id_sum
        self.value += value

    def check(self, job: Job) -> None:
        n = job.rows * job.count
        if self.rows != n or self.id_sum != n * (n - 1) // 2:
            raise RuntimeError(f"received {self.rows} rows (id sum {self.id_sum}), sent {n}")


def child(role: Callable[..., dict[str, float]], out: Connection, *args: Any) -> None:
    """Run one side of a measurement; send its result (or its traceback) to the parent."""
    try:
        out.send(role(*args))
    except BaseException:
        out.send({"error": traceback.format_exc()})
    finally:
        out.close()


# --- raw TCP -------------------------------------------------------------------------------

_HEADER = struct.Struct("<QQ")  # rows, logits bytes (rows == 0: the pass is over)


def tcp_sender(job: Job, ready: Connection, barrier: Any, done: Any) -> dict[str, float]:
    """Length-prefixed raw buffers, ``sendall`` of memoryviews (no copy in Python)."""
    pool = make_pool(job)
    with socket.create_server(("127.0.0.1", 0)) as server:
        ready.send(server.getsockname()[1])
        sock, _ = server.accept()
    with sock:
        for timed in (False, True):
            if timed:
                barrier.wait(TIMEOUT)
                cpu0 = cpu_seconds()
            for i in range(job.count):
                ids, logits = batch_ids(job, i), pool[i % len(pool)]
                sock.sendall(_HEADER.pack(len(ids), logits.nbytes))
                sock.sendall(memoryview(ids).cast("B"))
                sock.sendall(memoryview(logits).cast("B"))
            sock.sendall(_HEADER.pack(0, 0))
        done.wait(TIMEOUT)
        return {"cpu": cpu_seconds() - cpu0}


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("the sender closed the connection early")
        got += n


def tcp_receiver(job: Job, port: int, barrier: Any, done: Any) -> dict[str, float]:
    """``recv_into`` preallocated numpy buffers (one batch, reused)."""
    ids = np.empty(job.rows, np.int64)
    logits = np.empty((job.rows, WIDTH), np.float32)
    header = bytearray(_HEADER.size)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for timed in (False, True):
            if timed:
                barrier.wait(TIMEOUT)
                t0, cpu0 = time.perf_counter(), cpu_seconds()
            tally = Tally()
            while True:
                recv_exactly(sock, memoryview(header))
                rows, size = _HEADER.unpack(header)
                if rows == 0:
                    break
                if rows != job.rows or size != logits.nbytes:
                    raise RuntimeError(f"unexpected batch header {rows}, {size}")
                recv_exactly(sock, memoryview(ids).cast("B"))
                recv_exactly(sock, memoryview(logits).cast("B"))
                tally.add(ids, logits)
            tally.check(job)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    done.set()
    return {"seconds": seconds, "cpu": cpu, "batches": tally.batches}


# --- pickle over a multiprocessing manager queue (Pantheon's transport) -------------------
# Pickle is used here ONLY as this comparison baseline: multiprocessing's manager pickles
# every object that goes through its queue, as the older Pantheon toolkit's transport did.
# kdserve's src/ never pickles.

_KNOWLEDGE: queue.Queue[Any] | None = None


def knowledge_queue() -> queue.Queue[Any]:
    """The queue the manager process serves (created in that process)."""
    global _KNOWLEDGE  # noqa: PLW0603 -- one queue per manager process, as in Pantheon
    if _KNOWLEDGE is None:
        _KNOWLEDGE = queue.Queue(QUEUE_SIZE)
    return _KNOWLEDGE


class QueueManager(BaseManager):
    """Serves the knowledge queue, as Pantheon's teacher does (``BaseManager.start()``)."""


QueueManager.register("knowledge_queue", callable=knowledge_queue)
_AUTHKEY = b"online-bench"


def pickle_sender(job: Job, ready: Connection, barrier: Any, done: Any) -> dict[str, float]:
    """Start the manager (its own process), put dicts of numpy arrays into its queue."""
    pool = make_pool(job)
    manager = QueueManager(("127.0.0.1", 0), authkey=_AUTHKEY, ctx=mp.get_context("spawn"))
    manager.start()
    try:
        pid = manager._process.pid  # type: ignore[attr-defined] # the manager's server process
        q = manager.knowledge_queue()  # type: ignore[attr-defined]
        ready.send(manager.address)
        for timed in (False, True):
            if timed:
                barrier.wait(TIMEOUT)
                cpu0, helper0 = cpu_seconds(), proc_cpu_seconds(pid)
            for i in range(job.count):
                q.put({"sample_id": batch_ids(job, i), "logits": pool[i % len(pool)]})
            q.put(None)
        done.wait(TIMEOUT)
        return {"cpu": cpu_seconds() - cpu0 + proc_cpu_seconds(pid) - helper0}
    finally:
        manager.shutdown()


def pickle_receiver(job: Job, address: Any, barrier: Any, done: Any) -> dict[str, float]:
    """Connect to the teacher's manager and get batches from its queue."""
    manager = QueueManager(address, authkey=_AUTHKEY)
    manager.connect()
    q = manager.knowledge_queue()  # type: ignore[attr-defined]
    for timed in (False, True):
        if timed:
            barrier.wait(TIMEOUT)
            t0, cpu0 = time.perf_counter(), cpu_seconds()
        tally = Tally()
        while (batch := q.get()) is not None:
            tally.add(batch["sample_id"], batch["logits"])
        tally.check(job)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    done.set()
    return {"seconds": seconds, "cpu": cpu, "batches": tally.batches}


# --- kdserve ---------------------------------------------------------------------------------


def kdserve_teacher(job: Job, ready: Connection, barrier: Any, done: Any) -> dict[str, float]:
    """A Teacher serving two passes (warm-up, timed) of precomputed logits."""
    pool = make_pool(job)

    def reader() -> Iterator[dict[str, np.ndarray]]:
        for i in range(job.count):
            yield {"sample_id": batch_ids(job, i)}

    def program(feed: dict[str, Any]) -> dict[str, np.ndarray]:
        return {"logits": pool[int(feed["sample_id"][0]) // job.rows % len(pool)]}

    teacher = kd.Teacher(out_port=0, token=TOKEN, progress=False, chunk_bytes=job.chunk_bytes)
    teacher.start()
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            teacher.start_knowledge_service(
                ["sample_id"],
                ["logits"],
                program,
                {"batch_generator": reader},
                buf_size=job.buf_size,
                times=2,
            )
        except BaseException as exc:
            failure.append(exc)

    service = threading.Thread(target=serve, daemon=True)
    service.start()
    try:
        wait_until_serving(teacher.address)
        ready.send(teacher.address)
        barrier.wait(TIMEOUT)  # the student has the warm-up pass
        cpu0 = cpu_seconds()
        done.wait(TIMEOUT)
        service.join(TIMEOUT)
        cpu = cpu_seconds() - cpu0
        if failure:
            raise failure[0]
        return {"cpu": cpu}
    finally:
        teacher.close()


def wait_until_serving(address: str) -> None:
    """Return once the teacher at ``address`` streams and has published its schema."""
    client = TeacherClient(address, name="probe", token=TOKEN, connect_timeout=30)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if client.teacher_info().stream:
                    client.schema()
                    return
            except kd.KdserveError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.01)
    finally:
        client.close()


def bench_schema() -> kd.Schema:
    """The knowledge schema: one float32 logits field of width 1000 (plus sample_id)."""
    return kd.Schema([kd.Field("logits", "float32", (WIDTH,))])


def warm_pyarrow() -> None:
    """Pay pyarrow's one-time lazy imports (~0.1 s) before any pass, like any long run does."""
    schema = bench_schema()
    arrays = {"logits": np.zeros((1, WIDTH), np.float32)}
    kd.from_record_batch(kd.to_record_batch(arrays, schema, np.zeros(1, np.int64)), schema)


def kdserve_student(job: Job, address: str, barrier: Any, done: Any) -> dict[str, float]:
    """``Student.get_knowledge_generator(rows)``: one pass to warm up, one timed."""
    warm_pyarrow()
    student = kd.Student(token=TOKEN)
    student.register_teacher(in_address=address)
    student.start()
    passes = student.get_knowledge_generator(job.rows)
    for timed in (False, True):
        if timed:
            barrier.wait(TIMEOUT)
            t0, cpu0 = time.perf_counter(), cpu_seconds()
        tally = Tally()
        for batch in passes():
            tally.add(batch["sample_id"], batch["logits"])
        tally.check(job)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    done.set()
    return {"seconds": seconds, "cpu": cpu, "batches": tally.batches}


def kdserve_stream(job: Job, address: str, barrier: Any, done: Any) -> dict[str, float]:
    """``TeacherClient.stream_pass``: the parts as they arrive, no merge, no prefetch."""
    warm_pyarrow()
    client = TeacherClient(address, name="bench", token=TOKEN)
    info = client.teacher_info()
    schema = client.schema()
    ack_every = max(1, info.buf_size // 2)  # what the Student uses
    for pass_ in (0, 1):
        if pass_:
            barrier.wait(TIMEOUT)
            t0, cpu0 = time.perf_counter(), cpu_seconds()
        tally = Tally()
        rows = 0
        for part in client.stream_pass(pass_, 0, 1, ack_every):
            arrays = kd.from_record_batch(part, schema)
            rows += part.num_rows
            tally.add(arrays["sample_id"], arrays["logits"], whole_batch=rows % job.rows == 0)
        tally.check(job)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    done.set()
    client.close()
    return {"seconds": seconds, "cpu": cpu, "batches": tally.batches}


# --- pyarrow Flight alone (no kdserve): what the gRPC transport itself allows --------------


class PlainFlightServer(flight.FlightServerBase):  # type: ignore[misc]
    """A bare Flight server: ``do_get`` streams one pass of the job's batches, in parts."""

    def __init__(self, job: Job) -> None:
        super().__init__("grpc://127.0.0.1:0")
        self.job = job
        self.pool = make_pool(job)
        self.schema = bench_schema()

    def do_get(self, context: Any, ticket: flight.Ticket) -> flight.GeneratorStream:
        job, pool, schema = self.job, self.pool, self.schema

        def parts() -> Iterator[pa.RecordBatch]:
            for i in range(job.count):
                logits = {"logits": pool[i % len(pool)]}
                yield from slice_rows(
                    kd.to_record_batch(logits, schema, batch_ids(job, i)), job.chunk_bytes
                )

        return flight.GeneratorStream(schema.to_arrow(), parts())


def flight_sender(job: Job, ready: Connection, barrier: Any, done: Any) -> dict[str, float]:
    """Serve the bare Flight server until the student is done."""
    server = PlainFlightServer(job)
    try:
        ready.send(server.port)
        barrier.wait(TIMEOUT)
        cpu0 = cpu_seconds()
        done.wait(TIMEOUT)
        return {"cpu": cpu_seconds() - cpu0}
    finally:
        server.shutdown()


def flight_receiver(job: Job, port: int, barrier: Any, done: Any) -> dict[str, float]:
    """``FlightClient.do_get``: parts as they arrive, read like the stream_pass student."""
    warm_pyarrow()
    schema = bench_schema()
    client = flight.FlightClient(f"grpc://127.0.0.1:{port}")
    client.wait_for_available(30)
    for timed in (False, True):
        if timed:
            barrier.wait(TIMEOUT)
            t0, cpu0 = time.perf_counter(), cpu_seconds()
        tally = Tally()
        rows = 0
        for chunk in client.do_get(flight.Ticket(b"pass")):
            arrays = kd.from_record_batch(chunk.data, schema)
            rows += chunk.data.num_rows
            tally.add(arrays["sample_id"], arrays["logits"], whole_batch=rows % job.rows == 0)
        tally.check(job)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    done.set()
    client.close()
    return {"seconds": seconds, "cpu": cpu, "batches": tally.batches}


ROLES: dict[str, tuple[Callable[..., dict[str, float]], Callable[..., dict[str, float]]]] = {
    M_STUDENT: (kdserve_teacher, kdserve_student),
    M_STREAM: (kdserve_teacher, kdserve_stream),
    M_TCP: (tcp_sender, tcp_receiver),
    M_PICKLE: (pickle_sender, pickle_receiver),
    M_FLIGHT: (flight_sender, flight_receiver),
}


# --- the parent: one measurement ------------------------------------------------------------


def measure(job: Job) -> Sample:
    """Run one job in a fresh teacher process and a fresh student process."""
    ctx = mp.get_context("spawn")
    send_role, recv_role = ROLES[job.method]
    barrier, done = ctx.Barrier(2), ctx.Event()
    ready_in, ready_out = ctx.Pipe(duplex=False)
    send_in, send_out = ctx.Pipe(duplex=False)
    recv_in, recv_out = ctx.Pipe(duplex=False)
    sender = ctx.Process(
        target=child, args=(send_role, send_out, job, ready_out, barrier, done), name="teacher"
    )
    sender.start()
    procs = [sender]
    try:
        if not ready_in.poll(TIMEOUT):
            raise RuntimeError(f"{job.method}: the teacher did not start: {failure(send_in)}")
        address = ready_in.recv()
        receiver = ctx.Process(
            target=child, args=(recv_role, recv_out, job, address, barrier, done), name="student"
        )
        receiver.start()
        procs.append(receiver)
        results = []
        for conn, side in ((recv_in, "student"), (send_in, "teacher")):
            if not conn.poll(TIMEOUT):
                raise RuntimeError(f"{job.method}: the {side} did not finish in {TIMEOUT:g} s")
            result = conn.recv()
            if "error" in result:
                raise RuntimeError(f"{job.method}: the {side} failed:\n{result['error']}")
            results.append(result)
        for p in procs:
            p.join(TIMEOUT)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    got, sent = results
    return Sample(got["seconds"], sent["cpu"], got["cpu"], job.nbytes, int(got["batches"]))


def failure(conn: Connection) -> str:
    """The child's error, if it sent one."""
    if conn.poll(1):
        return str(conn.recv().get("error", "?"))
    return "no answer"


# --- the benchmark ---------------------------------------------------------------------------


def chunk_label(chunk: int) -> str:
    return "one part" if chunk >= ONE_PART else f"{chunk / MIB:g}MiB"


def size_label(rows: int) -> str:
    return f"{rows * ROW_BYTES / MB:.0f}MB"


def rotate(items: list[Job], k: int) -> list[Job]:
    """``items`` started at position ``k``, so no job always runs first."""
    k %= len(items)
    return items[k:] + items[:k]


def plan(args: argparse.Namespace) -> tuple[list[Job], list[Job]]:
    """The main jobs (every size, every method) and the chunk sweep's extra jobs."""
    main: list[Job] = []
    for batch_mb in args.batch_mb:
        rows = max(1, round(batch_mb * MB / ROW_BYTES))
        count = max(2, round(args.total_mb / batch_mb))
        for method in args.methods:
            main.append(
                Job(
                    method=method,
                    rows=rows,
                    count=count,
                    buf_size=args.buf_size,
                    pool_mb=args.pool_mb,
                    seed=args.seed,
                )
            )
    sweep: list[Job] = []
    largest = [j for j in main if j.rows == max(m.rows for m in main) and j.method in CHUNKED]
    for job in largest:
        for chunk in args.chunks:
            if chunk != DEFAULT_CHUNK_BYTES:
                sweep.append(replace(job, chunk_bytes=chunk))
    return main, sweep


def median(samples: list[Sample], key: Callable[[Sample], float]) -> float:
    return statistics.median(key(s) for s in samples)


def table(jobs: list[Job], results: dict[Job, list[Sample]]) -> list[str]:
    """One line per (size, method): throughput, batches/s, CPU, ratios to the baselines."""
    header = (
        "size",
        "method",
        "chunk",
        "parts",
        "MB/s",
        "min..max",
        "batches/s",
        "CPU-s/GB",
        "teacher+student",
        "x TCP",
        "x pickle",
    )
    rows: list[tuple[str, ...]] = []
    sizes = sorted({j.rows for j in jobs})
    for size in sizes:
        group = [j for j in jobs if j.rows == size]
        base = {j.method: median(results[j], lambda s: s.mb_s) for j in group}
        for j in group:
            samples = results[j]
            mb_s = median(samples, lambda s: s.mb_s)
            scale = j.nbytes / 1e9
            split = (
                f"{median(samples, lambda s: s.cpu_send) / scale:.2f}"
                f"+{median(samples, lambda s: s.cpu_recv) / scale:.2f}"
            )
            kd_path = j.method in CHUNKED
            rows.append(
                (
                    size_label(j.rows),
                    j.method,
                    chunk_label(j.chunk_bytes) if kd_path else "-",
                    str(j.parts) if kd_path else "-",
                    fmt(mb_s),
                    f"{fmt(min(s.mb_s for s in samples))}..{fmt(max(s.mb_s for s in samples))}",
                    fmt(median(samples, lambda s: s.batches_s)),
                    f"{median(samples, lambda s: s.cpu_gb):.2f}",
                    split,
                    f"{mb_s / base[M_TCP]:.2f}x" if M_TCP in base else "",
                    f"{mb_s / base[M_PICKLE]:.1f}x" if M_PICKLE in base else "",
                )
            )
        rows.append(("",) * len(header))
    return align(header, rows[:-1], right={3, 4, 5, 6, 7, 8, 9, 10})


def sweep_table(jobs: list[Job], results: dict[Job, list[Sample]]) -> list[str]:
    """The chunk_bytes sweep: the chunked paths at one batch size, per chunk size."""
    header = ("size", "chunk_bytes", "parts", "method", "MB/s", "min..max", "CPU-s/GB")
    rows = []
    for j in sorted(jobs, key=lambda j: (j.chunk_bytes, METHODS.index(j.method))):
        samples = results[j]
        rows.append(
            (
                size_label(j.rows),
                chunk_label(j.chunk_bytes)
                + (" (default)" if j.chunk_bytes == DEFAULT_CHUNK_BYTES else ""),
                str(j.parts),
                j.method,
                fmt(median(samples, lambda s: s.mb_s)),
                f"{fmt(min(s.mb_s for s in samples))}..{fmt(max(s.mb_s for s in samples))}",
                f"{median(samples, lambda s: s.cpu_gb):.2f}",
            )
        )
    return align(header, rows, right={2, 4, 5, 6})


def align(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    """Rows as aligned text, with a header and a rule."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return [line(header), line(tuple("-" * w for w in widths)), *[line(r) for r in rows]]


def goals(jobs: list[Job], results: dict[Job, list[Sample]]) -> list[tuple[str, bool]]:
    """The goals, on the Student path (what users get); stream_pass as extra lines."""
    out = []
    for size in sorted({j.rows for j in jobs}):
        group = {j.method: j for j in jobs if j.rows == size}
        label = size_label(size)
        for method, extra in ((M_STUDENT, ""), (M_STREAM, "extra: ")):
            if method not in group:
                continue
            ours = median(results[group[method]], lambda s: s.mb_s)
            name = "Student" if method == M_STUDENT else "stream_pass"
            for base, goal, what in (
                (M_TCP, TCP_GOAL, "raw TCP"),
                (M_PICKLE, PICKLE_GOAL, "pickle"),
            ):
                if base in group:
                    ratio = ours / median(results[group[base]], lambda s: s.mb_s)
                    out.append(
                        (
                            f"{label}: {extra}{name} >= {goal:g}x {what} ({ratio:.2f}x)",
                            ratio >= goal,
                        )
                    )
            cpu = median(results[group[method]], lambda s: s.cpu_gb)
            out.append(
                (f"{label}: {extra}{name} <= {CPU_GOAL:g} CPU-s/GB ({cpu:.2f})", cpu <= CPU_GOAL)
            )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None, help="repeats per measurement (5)")
    p.add_argument("--quick", action="store_true", help="small data, 1 repeat: a smoke test")
    p.add_argument(
        "--batch-mb", type=float, nargs="+", default=[1.0, 6.0, 32.0], help="batch sizes, MB"
    )
    p.add_argument("--total-mb", type=float, default=None, help="MB per timed pass (512)")
    p.add_argument(
        "--chunk-mib",
        type=float,
        nargs="*",
        default=[1.0, 4.0, 16.0, 0.0],
        help="chunk_bytes sweep at the largest size, MiB (0: one part per batch)",
    )
    p.add_argument(
        "--methods", nargs="+", choices=METHODS, default=METHODS, metavar="METHOD", help="subset"
    )
    p.add_argument(
        "--buf-size", type=int, default=10, help="the teacher's buf_size (10, the library's)"
    )
    p.add_argument("--pool-mb", type=float, default=64.0, help="distinct precomputed logits, MB")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.buf_size < 1:
        p.error("--buf-size must be >= 1")
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.total_mb = args.total_mb or (32.0 if args.quick else 512.0)
    args.chunks = [int(c * MIB) if c > 0 else ONE_PART for c in args.chunk_mib]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every measurement, print the tables and the goals."""
    args = parse_args(argv)
    print(
        f"kdserve {kd.__version__}, numpy {np.__version__}, pyarrow {pa.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}"
    )
    main_jobs, sweep_jobs = plan(args)
    print(
        f"repeats={args.repeats} total={args.total_mb:g}MB per timed pass (after one warm-up "
        f"pass) chunk_bytes={chunk_label(DEFAULT_CHUNK_BYTES)} (default) buf_size={args.buf_size} "
        f"pool={args.pool_mb:g}MB"
    )
    for rows in sorted({j.rows for j in main_jobs}):
        j = next(j for j in main_jobs if j.rows == rows)
        print(
            f"case {size_label(rows)}: {j.count} batches of {rows} rows "
            f"({j.batch_bytes / MB:.2f} MB each, {j.nbytes / MB:.0f} MB per pass)"
        )
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    t0 = time.perf_counter()
    jobs = main_jobs + sweep_jobs
    results: dict[Job, list[Sample]] = {j: [] for j in jobs}
    for rep in range(args.repeats):
        for job in rotate(jobs, rep * 5):
            results[job].append(measure(job))
        print(
            f"repeat {rep + 1}/{args.repeats} done ({time.perf_counter() - t0:.0f} s)", flush=True
        )
    print()
    print("\n".join(table(main_jobs, results)))
    print(
        "MB/s: knowledge bytes per second of the student's wall clock (median of repeats); "
        "CPU-s/GB: CPU of all processes per GB moved, split teacher+student (the pickle "
        "teacher includes its manager process); x TCP / x pickle: MB/s over that baseline's"
    )
    largest = max(j.rows for j in main_jobs)
    swept = [j for j in jobs if j.rows == largest and j.method in CHUNKED]
    if len({j.chunk_bytes for j in swept}) > 1:
        print()
        print("chunk_bytes sweep:")
        print("\n".join(sweep_table(swept, results)))
    print()
    for text, ok in goals(main_jobs, results):
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n({time.perf_counter() - t0:.0f} s; load average after: {load})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
