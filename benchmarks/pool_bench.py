"""Teacher pools on Ray (issue #12): knowledge rate with N = 1, 2, 4 replicas of a
latency-bound teacher (each batch takes a fixed time and releases the GIL, as a GPU
teacher does), against N times one replica measured in the same run; goal >= 0.9 N.

Three paths: queries spread by ``PoolClient.query_stream`` (``2N`` in flight), passes over
the pool's own data (a ``Student`` with ``add_pool``: ``2N`` parts ahead), and a pooled
``dump`` (one part per replica, combined into one store). Medians of ``--repeats``.

    python benchmarks/pool_bench.py            # about a minute on 2 cores (local Ray)
    python benchmarks/pool_bench.py --quick    # smoke test

On a cluster, start Ray on every node (``ray start --head`` / ``ray start
--address=HEAD:6379``), run with ``--address auto --host 0.0.0.0``-style settings in your
own driver (replicas must listen on a routable address: ``TeacherPool(host=...)``), and
give each replica a GPU (``num_gpus=1``).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from report import run_table

import kdserve as kd
from kdserve.ray import PoolClient, TeacherPool


def make_program(delay: float) -> Any:
    """A latency-bound teacher: ``delay`` seconds a batch, GIL released."""

    def program(feed: dict[str, Any]) -> dict[str, Any]:
        time.sleep(delay)
        return {"y": feed["x"] * 2}

    return program


def part_batches(part: int, parts: int, batches: int, size: int) -> list[dict[str, Any]]:
    """Part ``part`` of ``parts`` of ``batches`` batches of ``size`` rows."""
    x = np.ones((size, 64), np.float32)
    return [
        {"x": x, "sample_id": np.arange(b * size, (b + 1) * size)}
        for b in range(part, batches, parts)
    ]


def pass_batches(epoch: int, part: int, parts: int, batches: int, size: int) -> list[Any]:
    """Part ``part`` of ``parts`` of a pass over the pool's own data."""
    return part_batches(part, parts, batches, size)


def measure(args: argparse.Namespace, replicas: int) -> tuple[float, float, float]:
    """Samples/s of queries, of passes over the pool's data and of a pooled dump with
    ``replicas`` replicas (medians)."""
    keep = kd.Schema([kd.Field("y", "float32", (64,))])
    factory = functools.partial(make_program, args.delay)
    name = f"bench-{replicas}"
    with TeacherPool(name, factory, feeds=["x"], keep=keep, replicas=replicas, num_cpus=0) as pool:
        client = PoolClient(name)
        inputs = [{"x": np.ones((args.size, 64), np.float32)}] * args.batches
        client.query({"x": inputs[0]["x"]})  # connected to one
        pool.serve(
            functools.partial(pass_batches, batches=args.batches, size=args.size),
            parts=args.batches // 2,
        )
        student = kd.Student()
        student.add_pool(name)
        reader = student.loader(batch_size=args.size)
        queries, passes, dumps = [], [], []
        for r in range(args.repeats):
            start = time.perf_counter()
            samples = sum(len(b["sample_id"]) for b in reader)
            passes.append(samples / (time.perf_counter() - start))
            start = time.perf_counter()
            for _ in client.query_stream(inputs, max_in_flight=2 * replicas):
                pass
            queries.append(args.batches * args.size / (time.perf_counter() - start))
            data = functools.partial(part_batches, batches=args.batches, size=args.size)
            with tempfile.TemporaryDirectory(prefix="kdserve-pool-") as tmp:
                start = time.perf_counter()
                rows = pool.dump(data, Path(tmp) / f"store-{r}")
                dumps.append(rows / (time.perf_counter() - start))
        student.close()
    return statistics.median(queries), statistics.median(passes), statistics.median(dumps)


def run(args: argparse.Namespace, _: Path) -> list[str]:
    rates = {n: measure(args, n) for n in args.replicas}
    one = rates[args.replicas[0]]
    lines = [
        f"{'replicas':>8} {'queries/s':>10} {'x one':>6} {'passes/s':>9} {'x one':>6} "
        f"{'dump/s':>8} {'x one':>6}  goal >= 0.9 N"
    ]
    for n, rate in rates.items():
        ratios = [r / o for r, o in zip(rate, one, strict=True)]
        ok = all(x >= 0.9 * n for x in ratios)
        cells = " ".join(f"{r:>9.0f} {x:>6.2f}" for r, x in zip(rate, ratios, strict=True))
        lines.append(f"{n:>8} {cells}  {'PASS' if ok else 'FAIL'}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 and 2 replicas, few batches")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--delay", type=float, default=0.05, help="seconds a batch takes")
    p.add_argument("--batches", type=int, default=80)
    p.add_argument("--size", type=int, default=256, help="samples a batch")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.quick:
        args.replicas, args.batches, args.repeats, args.delay = [1, 2], 8, 1, 0.02
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        print(
            f"kdserve {kd.__version__}, ray {ray.__version__}; a teacher taking {args.delay} s "
            f"a batch of {args.size}, {args.batches} batches, {args.repeats} repeat(s)"
        )
        return run_table("kdserve-pool-", lambda workdir: run(args, workdir))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
