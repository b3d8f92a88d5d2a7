"""What the benchmarks share for printing their tables."""

from __future__ import annotations

import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fmt(value: float) -> str:
    """A number with three significant figures or so, aligned by the caller."""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def cpu_seconds() -> float:
    """CPU time this process has used, user + system, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn: Callable[[], Any]) -> float:
    """The CPU seconds ``fn()`` takes (all threads)."""
    start = cpu_seconds()
    fn()
    return cpu_seconds() - start


def store_bytes(path: Path) -> int:
    """Bytes of a store's shards (the knowledge, without the manifest)."""
    return sum(s.stat().st_size for s in path.glob("shard-*.arrow"))


def alternate(
    pair: tuple[Callable[[], float], Callable[[], float]], repeats: int, warm_up: bool = False
) -> tuple[list[float], list[float]]:
    """The bare side and kdserve's, ``repeats`` times each, alternating which goes first
    (after one untimed run of each with ``warm_up``)."""
    if warm_up:
        for fn in pair:
            fn()
    bare: list[float] = []
    ours: list[float] = []
    for r in range(repeats):
        order = [(0, pair[0]), (1, pair[1])]
        for side, fn in order if r % 2 == 0 else reversed(order):
            (bare if side == 0 else ours).append(fn())
    return bare, ours


def ratio_row(
    name: str, bare: list[float], ours: list[float], goal: float | None, width: int
) -> str:
    """A table row: medians, kdserve's spread, their ratio and the verdict against ``goal``."""
    ratio = statistics.median(ours) / statistics.median(bare)
    verdict = "" if goal is None else ("PASS" if ratio >= goal else "FAIL") + f" >= {goal}"
    spread = f"{fmt(min(ours))}..{fmt(max(ours))}"
    return (
        f"{name:<{width}} {fmt(statistics.median(bare)):>9} {fmt(statistics.median(ours)):>9} "
        f"{spread:<19} {ratio:>6.3f}  {verdict}"
    )


def serve_one_pass(service: Any, batch: int, timeout: float) -> tuple[int, float]:
    """Have a student process (spawned, connected first) read one pass from ``service``;
    return the samples served and when the student asked for the pass."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    args = (service.address, batch, ready, go, timeout)
    student = ctx.Process(target=read_one_pass, args=args)
    student.start()
    assert ready.wait(2 * timeout), "the student process did not connect"
    start = time.perf_counter()
    go.set()
    served = service.wait(timeout=10 * timeout)
    student.join(2 * timeout)
    assert student.exitcode == 0, f"the student process exited with {student.exitcode}"
    return int(served), start


def read_one_pass(address: str, batch: int, ready: Any, go: Any, timeout: float) -> None:
    """A student process for timing a served teacher: connects, says ``ready``, waits for
    ``go``, then reads one pass as fast as it can."""
    import kdserve as kd

    with kd.Student(connect_timeout=timeout) as student:
        student.add_teacher(address)
        student.start()
        ready.set()
        go.wait(2 * timeout)
        for _ in student.loader(batch_size=batch):
            pass


def run_table(prefix: str, run: Callable[[Path], list[str]]) -> int:
    """Run a benchmark in a scratch directory (removed after), print its table and how
    long it took; the exit status."""
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        lines = run(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(lines))
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0
