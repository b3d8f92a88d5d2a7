"""CPU proxy for "kdserve never slows the accelerator": kdserve's rate as a fraction of the
bare loop a user would write without it, with the device's work stood in for by a fixed
time per batch, ``--device-ms``: its first ``--launch-ms`` are Python holding the GIL (the
host launching kernels, which PyTorch does holding the GIL), the rest a ``time.sleep``
(the GPU computing while the host waits). What kdserve adds on the host -- encoding,
writing, reading, merging, re-batching, prefetching -- must hide behind that time without
taking the GIL from the launching thread, as it must beside a real GPU (on an H100 a
ResNet-18 training step at batch 256 is launch-bound: ~16 ms of host time per step).

Teacher side (batches of ``--batch`` feeds, float32 logits of width ``--width``):

* bare loop: ``for feed in data: program(feed)`` (the device time, then the logits
  are on the host), knowledge kept in memory;
* ``kd.dump``: the same program over the same data into a store (fp16 knowledge);
* ``kd.serve``: the same program served to a student in another process (times=1);
* (with PyTorch) ``kd.dump`` of an ``nn.Module`` doing the same as a ``teacher_program``,
  against the module called in a loop: what the program wrapper adds (its lane thread).

Student side (knowledge of 1, 2 or 4 teachers in stores, merged with "mean"):

* bare loop: the knowledge already in memory, one device step per batch;
* ``Student.loader``: the stores read, aligned, merged and re-batched by kdserve, the same
  step per batch;
* (with PyTorch) ``KnowledgeDataset`` in a ``DataLoader`` with 0 and 2 worker processes,
  against tensors already in memory; and, for reference, a plain torch
  ``IterableDataset`` of in-memory tensors with 2 workers: the cost of torch's worker
  processes themselves.

Rates are samples per second; each is the median of ``--repeats`` runs in alternating
order, and the ratio is kdserve's median over the bare loop's, measured in the same run.
Goals (issue #10): >= 0.97 with one teacher, >= 0.9 with four.

    python benchmarks/proxy_bench.py            # full run, about a minute on 2 cores
    python benchmarks/proxy_bench.py --quick    # smoke test, seconds
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from report import alternate, ratio_row, run_table, serve_one_pass

import kdserve as kd

GOALS = {1: 0.97, 2: 0.9, 4: 0.9}  # teachers merged -> the student's goal


def make_data(args: argparse.Namespace) -> list[dict[str, np.ndarray]]:
    """The teacher's feeds: ``--batches`` batches of ``--batch`` small input vectors."""
    rng = np.random.default_rng(0)
    return [
        {"x": rng.standard_normal((args.batch, 16)).astype(np.float32)} for _ in range(args.batches)
    ]


def device_work(args: argparse.Namespace) -> None:
    """One batch's device time, ``--device-ms``: its first ``--launch-ms`` hold the GIL
    (the host launching kernels, as PyTorch does, which other threads' Python slows),
    the rest is waited for with the GIL released (the device computing)."""
    launch, total = args.launch_ms / 1000, args.device_ms / 1000
    start = time.perf_counter()
    while time.perf_counter() - start < launch:
        pass
    time.sleep(max(0.0, total - (time.perf_counter() - start)))


def make_program(args: argparse.Namespace, seed: int) -> Callable[[dict[str, Any]], Any]:
    """A teacher whose device time is ``--device-ms`` per batch (see ``device_work``)."""
    pool = np.random.default_rng(seed).standard_normal((4, args.batch, args.width))
    pool = pool.astype(np.float32)
    ends: list[float] = []  # when each call's device work ended

    def program(feed: dict[str, Any]) -> dict[str, np.ndarray]:
        if args.device_ms:
            device_work(args)  # the forward pass: launched, then computed on the device
        ends.append(time.perf_counter())
        return {"logits": pool[len(ends) % len(pool)][: len(feed["x"])]}

    program.ends = ends  # type: ignore[attr-defined]
    return program


# --- teacher ---------------------------------------------------------------------------


def teacher_bare(args: argparse.Namespace, workdir: Path) -> float:
    data, program = make_data(args), make_program(args, 1)
    start = time.perf_counter()
    kept = [program(feed)["logits"] for feed in data]
    seconds = time.perf_counter() - start
    assert len(kept) == len(data)
    return len(data) * args.batch / seconds


def teacher_dump(args: argparse.Namespace, workdir: Path) -> float:
    return timed_dump(args, make_program(args, 1), workdir / "dump")


def timed_dump(args: argparse.Namespace, program: Any, path: Path) -> float:
    """Samples per second of ``kd.dump(program)`` over the data into a new store."""
    data = make_data(args)
    shutil.rmtree(path, ignore_errors=True)
    start = time.perf_counter()
    written = kd.dump(program, data, path, use_fp16=True, progress=False)
    seconds = time.perf_counter() - start
    assert written == len(data) * args.batch
    return written / seconds


def teacher_serve(args: argparse.Namespace, workdir: Path) -> float:
    """The device's rate while serving: from the moment the student process (started,
    connected) asks for the pass to the end of the last batch's device work. The first
    batch, computed while the teacher waited for its student, is not counted; what follows
    the last batch (the student reads it, acknowledges, the service ends) is not device
    time."""
    data, program = make_data(args), make_program(args, 1)
    with kd.serve(program, data, keep=["logits"], use_fp16=True, progress=False) as service:
        served, start = serve_one_pass(service, args.batch, 30.0)
    assert served == len(data) * args.batch
    return (served - args.batch) / (program.ends[-1] - start)  # type: ignore[attr-defined]


def torch_teacher(args: argparse.Namespace) -> Any:
    """An ``nn.Module`` whose forward pass is the device time and returns the logits."""
    import torch

    class Teacher(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            pool = np.random.default_rng(1).standard_normal((4, args.batch, args.width))
            self.pool = torch.from_numpy(pool.astype(np.float32))
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            device_work(args)
            self.calls += 1
            return self.pool[self.calls % 4][: len(x)]

    return Teacher()


def program_bare(args: argparse.Namespace, workdir: Path) -> float:
    """The module called over the data, as a user's loop calls it (torch rows)."""
    import torch

    data, module = make_data(args), torch_teacher(args)
    start = time.perf_counter()
    with torch.inference_mode():
        kept = [module(torch.from_numpy(feed["x"])).numpy() for feed in data]
    seconds = time.perf_counter() - start
    assert len(kept) == len(data)
    return len(data) * args.batch / seconds


def program_dump(args: argparse.Namespace, workdir: Path) -> float:
    """``kd.dump`` of the module as a ``teacher_program`` (its lane thread included)."""
    from kdserve.torch import teacher_program

    program = teacher_program(torch_teacher(args), devices=["cpu"])
    return timed_dump(args, program, workdir / "dump-program")


# --- student ---------------------------------------------------------------------------


def prepare_stores(args: argparse.Namespace, workdir: Path, teachers: int) -> list[Path]:
    """``teachers`` stores of the same samples (no device time: they are only read)."""
    quick = argparse.Namespace(**{**vars(args), "device_ms": 0, "launch_ms": 0})
    paths = []
    for t in range(teachers):
        path = workdir / f"store-{t}"
        if not path.exists():
            kd.dump(make_program(quick, t), make_data(args), path, progress=False)
        paths.append(path)
    return paths


def train(batches: Iterable[Mapping[str, Any]], args: argparse.Namespace) -> float:
    """The student's loop: each batch touched, then one device step; samples per second."""
    start, rows = time.perf_counter(), 0
    for batch in batches:
        _ = batch["logits"][0, 0]
        rows += len(batch["logits"])
        device_work(args)  # the training step: launched, then computed on the device
    seconds = time.perf_counter() - start
    assert rows == args.batches * args.batch, rows
    return rows / seconds


def student_bare(args: argparse.Namespace, paths: list[Path]) -> float:
    """The knowledge in memory (merged already), one device step per batch."""
    logits = np.random.default_rng(0).standard_normal((args.batch, args.width))
    return train([{"logits": logits}] * args.batches, args)


def student_loader(args: argparse.Namespace, paths: list[Path]) -> float:
    with kd.Student(merge_strategy={"logits": "mean"}) as student:
        for path in paths:
            student.add_store(path)
        return train(student.loader(batch_size=args.batch), args)


def dataset_bare(args: argparse.Namespace, paths: list[Path]) -> float:
    """Tensors already in memory, one device step per batch (torch rows)."""
    import torch

    return train([{"logits": torch.zeros(args.batch, args.width)}] * args.batches, args)


def dataset_loader(args: argparse.Namespace, paths: list[Path] | None, workers: int) -> float:
    """``KnowledgeDataset`` (or, with ``paths=None``, the in-memory reference dataset) in a
    ``DataLoader`` with ``workers`` processes; the second of two passes is timed (workers
    persist, as in a training run)."""
    from torch.utils.data import DataLoader

    from kdserve.torch import KnowledgeDataset

    dataset = (
        _in_memory_dataset(args)
        if paths is None
        else KnowledgeDataset([str(p) for p in paths], batch_size=args.batch)
    )
    loader = DataLoader(
        dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0
    )
    train(loader, args)  # warm-up pass
    return train(loader, args)


def _in_memory_dataset(args: argparse.Namespace) -> Any:
    """A plain torch IterableDataset over tensors in memory, split over loader workers:
    what torch's worker processes cost without kdserve (the reference row)."""
    import torch
    from torch.utils.data import IterableDataset, get_worker_info

    class InMemory(IterableDataset):  # type: ignore[type-arg]
        def __init__(self) -> None:
            self.pool = [torch.zeros(args.batch, args.width) for _ in range(4)]
            self.ids = torch.arange(args.batch)

        def __iter__(self) -> Iterator[dict[str, Any]]:
            info = get_worker_info()
            workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
            for i in range(worker, args.batches, workers):
                yield {"sample_id": self.ids, "logits": self.pool[i % 4]}

    return InMemory()


# --- the run ---------------------------------------------------------------------------


def run(args: argparse.Namespace, workdir: Path) -> list[str]:
    lines = [
        f"{'what (samples/s)':<40} {'bare':>9} {'kdserve':>9} {'kdserve min..max':<19} "
        f"{'ratio':>6}  goal"
    ]
    teacher = {"teacher: kd.dump (store, fp16)": teacher_dump}
    if not args.quick:
        teacher["teacher: kd.serve -> a student process"] = teacher_serve
    for name, fn in teacher.items():
        bare, ours = alternate(
            (lambda: teacher_bare(args, workdir), lambda f=fn: f(args, workdir)), args.repeats
        )
        lines.append(ratio_row(name, bare, ours, GOALS[1], 40))
    for teachers in args.teachers:
        paths = prepare_stores(args, workdir, teachers)
        bare, ours = alternate(
            (lambda p=paths: student_bare(args, p), lambda p=paths: student_loader(args, p)),
            args.repeats,
        )
        label = f"student: {teachers} teacher(s), merged"
        lines.append(ratio_row(label, bare, ours, GOALS.get(teachers), 40))
    if args.torch:
        bare, ours = alternate(
            (lambda: program_bare(args, workdir), lambda: program_dump(args, workdir)),
            args.repeats,
        )
        lines.append(ratio_row("teacher: kd.dump, teacher_program", bare, ours, GOALS[1], 40))
        paths = prepare_stores(args, workdir, 1)
        for workers in (0, 2):
            bare, ours = alternate(
                (
                    lambda: dataset_bare(args, paths),
                    lambda w=workers: dataset_loader(args, paths, w),
                ),
                args.repeats,
            )
            label = f"student: KnowledgeDataset, {workers} workers"
            lines.append(ratio_row(label, bare, ours, GOALS[1], 40))
        bare, ours = alternate(
            (lambda: dataset_bare(args, paths), lambda: dataset_loader(args, None, 2)),
            args.repeats,
        )
        lines.append(ratio_row("reference: torch, in memory, 2 workers", bare, ours, None, 40))
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small, 1 repeat: a smoke test")
    p.add_argument("--repeats", type=int, default=5, help="runs per side (5)")
    p.add_argument("--batches", type=int, default=100, help="batches per pass (100)")
    p.add_argument("--batch", type=int, default=256, help="samples per batch (256)")
    p.add_argument("--width", type=int, default=1000, help="logits per sample (1000)")
    p.add_argument("--device-ms", type=float, default=10.0, help="device time per batch (10)")
    p.add_argument(
        "--launch-ms", type=float, default=5.0, help="of which the host holds the GIL (5)"
    )
    p.add_argument("--teachers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument(
        "--no-torch", dest="torch", action="store_false", help="skip the KnowledgeDataset rows"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.batches, args.teachers, args.torch = 1, 10, [1, 2], False
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"kdserve {kd.__version__}, numpy {np.__version__}, Python {platform.python_version()}, "
        f"{mp.cpu_count()} CPUs; {args.batches} batches of {args.batch} x {args.width} float32 "
        f"logits, {args.device_ms:g} ms of device time per batch ({args.launch_ms:g} ms holding "
        f"the GIL), {args.repeats} repeat(s)"
    )
    return run_table("kdserve-proxy-", lambda workdir: run(args, workdir))


if __name__ == "__main__":
    sys.exit(main())
