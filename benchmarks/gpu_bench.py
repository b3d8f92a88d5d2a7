"""GPU benchmark of issue #10, "kdserve never slows the GPU it feeds": kdserve's rate as a
fraction of the bare loop a user would write without it, both measured in the same run on
the same device, model and data.

Data: random uint8 images (``--images`` of 3 x ``--px`` x ``--px``, generated in memory),
for each batch size of ``--batch-sizes``.

Teacher side (ResNet-50 from torchvision, or a small conv net when torchvision is not
importable; bf16 autocast; 1000 logits per image):

* bare loop: for each batch, a pageable host-to-device copy, the forward pass, the logits
  to the host as float32, kept in memory;
* ``kd.dump``, defaults: ``teacher_program(net, inputs=["x"], outputs="logits",
  autocast=torch.bfloat16)`` over the same batches into a store (``use_fp16=True``), timed
  from the call to its return (the store complete and durable). On a GPU the program runs
  two CUDA streams and kd.dump calls it from two threads (one batch's copies overlap the
  other's forward pass), and each stream copies its inputs through pinned buffers;
* ``kd.dump``, pageable inputs: the defaults with ``pin_inputs=False`` (each batch copied
  from the feed's pageable memory, as the bare loop does);
* ``kd.dump``, ``streams=1``: one batch at a time, as the bare loop;
* ``kd.dump``, fp16 on the device: the defaults with ``output_dtype=torch.float16`` (logits
  cast on the device, half the bytes to the host);
* ``kd.serve``: the defaults' program served to a student in another process (spawn), which
  reads one pass; timed, as in ``proxy_bench.py``, from the moment the connected student
  asks for the pass to the end of the last batch's forward pass (logits on the host), not
  counting the first batch (computed while the teacher waited for its student).

Under each teacher row, where the time went in the last kdserve run and in a bare run:
the median program call, and the share of the run in which no call was running (the
device waiting for the host); under each student row, how long the training loop waited
for its next batch.

Student side (ResNet-18, or a small conv net; a training step = bf16-autocast forward,
``kd_loss`` against the teacher's logits at T=2, backward, SGD step; the images are on the
device already and picked by sample id on both sides, so the difference is how the
teacher's knowledge arrives; the store is a dump of random fp16 logits, made untimed):

* bare loop: the teacher's logits (and sample ids) already on the device;
* ``KnowledgeDataset(store, batch_size, pin_memory=True)`` in
  ``DataLoader(batch_size=None, num_workers=0)``, each batch moved with
  ``.to(device, non_blocking=True)``;
* ``KnowledgeDataset(pin_memory=False)`` in ``DataLoader(num_workers=--workers,
  pin_memory=True, persistent_workers=True)``, the same loop;
* reference (no goal): a plain torch ``IterableDataset`` of the same batches in memory, in
  the same DataLoader -- what torch's worker processes cost without kdserve.

On a CPU device nothing is pinned (pinning needs an accelerator; the output says so).
Rates are images per second, synchronised with the device at both ends of a pass. Every
side runs one untimed pass first (cuDNN autotuning, allocator, worker start-up), then
``--repeats`` timed passes in alternating order; the ratio is kdserve's median over the
bare loop's. Goal (issue #10): >= 0.95 everywhere. ``--images``, ``--batch-sizes``,
``--parts`` and ``--no-serve`` size the run; ``--quick`` is 512 images of 3x32x32, the small
nets, batch 64, one repeat. On a CPU the "device" work competes with kdserve's threads for
the same cores, so the ratios mean nothing there (``proxy_bench.py`` is the CPU measure).

    PYTHONPATH=src python benchmarks/gpu_bench.py             # the GPU run, a few minutes
    PYTHONPATH=src python benchmarks/gpu_bench.py --quick     # smoke test, seconds on a CPU

Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from report import alternate, ratio_row, run_table, serve_one_pass
from torch import nn

import kdserve as kd
from kdserve.torch import KnowledgeDataset, kd_loss, teacher_program

GOAL = 0.95
CLASSES = 1000


# --- models and data -------------------------------------------------------------------


def torchvision_models() -> Any | None:
    try:
        import torchvision
    except ImportError:
        return None
    return torchvision.models


class Normalize(nn.Module):
    """uint8 images in, the network's logits out (the scaling is part of the model)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float().div(255.0))


def make_net(role: str, args: argparse.Namespace) -> nn.Module:
    """ResNet-50 (teacher) or ResNet-18 (student) from torchvision, or a small conv net."""
    torch.manual_seed(0 if role == "teacher" else 1)
    models = None if args.small else torchvision_models()
    if models is not None:
        net = models.resnet50 if role == "teacher" else models.resnet18
        return Normalize(net(num_classes=CLASSES))
    width = 32 if role == "teacher" else 16
    return Normalize(
        nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, CLASSES),
        )
    )


def net_name(role: str, args: argparse.Namespace) -> str:
    if args.small or torchvision_models() is None:
        return "small conv net"
    return "ResNet-50" if role == "teacher" else "ResNet-18"


def make_images(args: argparse.Namespace) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (args.images, 3, args.px, args.px), dtype=np.uint8)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a CPU has none)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        torch.accelerator.synchronize(device)


def can_pin(device: torch.device) -> bool:
    """Whether pinned host memory helps (and works): only with an accelerator."""
    return device.type != "cpu" and torch.accelerator.is_available()


# --- teacher ---------------------------------------------------------------------------


class Teacher:
    """One batch size's teacher: the network, its kdserve programs and the feeds. Every
    program call's span is traced (``spans``), for the "where the time goes" lines."""

    def __init__(self, args: argparse.Namespace, images: np.ndarray, batch: int) -> None:
        self.args, self.batch, self.device = args, batch, torch.device(args.device)
        self.net = make_net("teacher", args).to(self.device).eval()
        common: dict[str, Any] = {
            "inputs": ["x"],
            "outputs": "logits",
            "devices": [args.device],
            "autocast": torch.bfloat16,
        }
        self.spans: list[tuple[float, float]] = []  # (start, end) of each traced call
        self.programs = {  # the defaults (two CUDA streams, pinned inputs on a GPU), ...
            "defaults": self.traced(teacher_program(self.net, **common)),
            "pageable inputs": self.traced(teacher_program(self.net, **common, pin_inputs=False)),
            "streams=1": self.traced(teacher_program(self.net, **common, streams=1)),
            "fp16 on device": self.traced(
                teacher_program(self.net, **common, output_dtype=torch.float16)
            ),
        }
        self.data = [{"x": images[i : i + batch]} for i in range(0, len(images), batch)]
        self.rows = len(images)
        self.window = (0.0, 0.0)  # the timed span of the last run
        self.bare_trace = ""  # where the last bare run's time went

    def traced(self, program: Any) -> Any:
        """``program``, with the span of each call on its lane recorded: its private
        ``_run``, which the lane thread runs (waiting in the lane's queue is not counted;
        wrapping the program itself would hide its ``submit`` from kd.dump)."""
        run = program._run

        def timed(*args: Any) -> Any:
            start = time.perf_counter()
            out = run(*args)
            self.spans.append((start, time.perf_counter()))
            return out

        program._run = timed
        return program

    def bare(self) -> float:
        device = self.device
        self.spans.clear()
        sync(device)
        start = time.perf_counter()
        kept = []
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            for feed in self.data:
                began = time.perf_counter()
                x = torch.from_numpy(feed["x"]).to(device)  # pageable, as a user writes it
                kept.append(self.net(x).float().cpu().numpy())
                self.spans.append((began, time.perf_counter()))
        self.window = (start, time.perf_counter())
        self.bare_trace = self.trace()
        assert sum(len(k) for k in kept) == self.rows
        return self.rows / (self.window[1] - start)

    def dump(self, workdir: Path, variant: str) -> float:
        program = self.programs[variant]
        path = workdir / f"dump-{self.batch}"
        shutil.rmtree(path, ignore_errors=True)
        self.spans.clear()
        sync(self.device)
        start = time.perf_counter()
        written = kd.dump(program, self.data, path, use_fp16=True, progress=False)
        self.window = (start, time.perf_counter())
        assert written == self.rows
        return written / (self.window[1] - start)

    def serve(self) -> float:
        """From the connected student's request to the end of the last forward pass."""
        program = self.programs["defaults"]
        self.spans.clear()
        with kd.serve(program, self.data, use_fp16=True, progress=False) as service:
            served, start = serve_one_pass(service, self.batch, 60.0)
        assert served == self.rows, served
        self.window = (start, max(end for _, end in self.spans))
        return (served - len(self.data[0]["x"])) / (self.window[1] - start)

    def where(self) -> str:
        """Where the time went in the last kdserve run and the last bare one."""
        return f"kdserve: {self.trace()}; bare: {self.bare_trace}"

    def trace(self) -> str:
        """The last run's median program call, and the share of the run in which no call
        was running (the device waiting for the host)."""
        start, end = self.window
        calls = sorted(s for s in self.spans if s[1] > start)
        busy, reach = 0.0, start
        for began, finish in calls:  # the union of the (possibly overlapping) calls
            begin = max(began, reach)
            if finish > begin:
                busy, reach = busy + finish - begin, finish
        median = statistics.median(f - b for b, f in calls) * 1e3
        return f"call p50 {median:.2f} ms, no call running {1 - busy / (end - start):.1%}"


# --- student ---------------------------------------------------------------------------


def prepare_store(args: argparse.Namespace, workdir: Path) -> Path:
    """A store of random fp16 logits for every image (only read: no device time)."""
    path = workdir / "student-store"
    if path.exists():
        return path
    pool = np.random.default_rng(2).standard_normal((4, 256, CLASSES)).astype(np.float32)
    calls = [0]

    def program(feed: dict[str, Any]) -> dict[str, np.ndarray]:
        calls[0] += 1
        return {"logits": pool[calls[0] % len(pool)][: len(feed["x"])]}

    data = [
        {"x": np.zeros((min(256, args.images - i), 1), np.uint8)}
        for i in range(0, args.images, 256)
    ]
    kd.dump(program, data, path, keep=["logits"], use_fp16=True, progress=False)
    return path


class StudentRun:
    """One batch size's student: the network, optimiser and the ways to feed it."""

    def __init__(self, args: argparse.Namespace, images: np.ndarray, store: Path, batch: int):
        self.args, self.batch, self.store = args, batch, store
        self.device = device = torch.device(args.device)
        self.pin = can_pin(device)
        self.images = torch.from_numpy(images).to(device)  # on the device on both sides
        self.net = make_net("student", args).to(device).train()
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9)
        # The bare loop's knowledge: the same batches, already on the device.
        dataset = KnowledgeDataset([str(store)], batch_size=batch)
        self.resident = [
            (b["sample_id"].to(device, copy=True), b["logits"].to(device, copy=True))
            for b in dataset
        ]
        self.rows = len(images)
        self.loader0 = torch.utils.data.DataLoader(
            KnowledgeDataset([str(store)], batch_size=batch, pin_memory=self.pin),
            batch_size=None,
            num_workers=0,
        )
        self.loader_w: torch.utils.data.DataLoader[Any] | None = None
        self.loader_r: torch.utils.data.DataLoader[Any] | None = None
        self.waits: list[float] = []  # per step of the last fed run: time in next()

    def step(self, ids: torch.Tensor, teacher: torch.Tensor) -> None:
        x = self.images[ids]
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            logits = self.net(x)
        loss = kd_loss(logits.float(), teacher, temperature=2.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def bare(self) -> float:
        sync(self.device)
        start = time.perf_counter()
        for ids, teacher in self.resident:
            self.step(ids, teacher)
        sync(self.device)
        return self.rows / (time.perf_counter() - start)

    def _feed(self, loader: Any) -> float:
        device = self.device
        self.waits.clear()
        sync(device)
        start, rows = time.perf_counter(), 0
        batches = iter(loader)
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            self.waits.append(time.perf_counter() - asked)
            if batch is None:
                break
            ids = batch["sample_id"].to(device, non_blocking=True)
            teacher = batch["logits"].to(device, non_blocking=True)
            rows += len(batch["sample_id"])
            self.step(ids, teacher)
        sync(device)
        seconds = time.perf_counter() - start
        assert rows == self.rows, (rows, self.rows)
        return rows / seconds

    def where(self) -> str:
        """How long the last fed run's steps waited for their batch."""
        waits = self.waits[:-1] or [0.0]  # the last: the loader's end
        return (
            f"the loop waited for a batch: p50 {statistics.median(waits) * 1e3:.2f} ms, "
            f"{sum(waits) * 1e3:.0f} ms a pass"
        )

    def dataset(self) -> float:
        return self._feed(self.loader0)

    def workers(self) -> float:
        if self.loader_w is None:  # made once: its workers persist between passes
            self.loader_w = torch.utils.data.DataLoader(
                KnowledgeDataset([str(self.store)], batch_size=self.batch, pin_memory=False),
                batch_size=None,
                num_workers=self.args.workers,
                pin_memory=self.pin,
                persistent_workers=True,
            )
        return self._feed(self.loader_w)

    def reference(self) -> float:
        """torch's own cost of worker processes, without kdserve: a plain IterableDataset
        of the same batches held in memory, in the same DataLoader."""
        if self.loader_r is None:
            batches = [{"sample_id": i.cpu(), "logits": t.cpu()} for i, t in self.resident]
            self.loader_r = torch.utils.data.DataLoader(
                InMemory(batches),
                batch_size=None,
                num_workers=self.args.workers,
                pin_memory=self.pin,
                persistent_workers=True,
            )
        return self._feed(self.loader_r)

    def close(self) -> None:
        self.loader_w = self.loader_r = None  # shuts their workers down


class InMemory(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """Batches held in memory, split over a DataLoader's workers (the reference row)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        return iter(self.batches[worker::workers])


# --- the run ---------------------------------------------------------------------------


def run(args: argparse.Namespace, images: np.ndarray, workdir: Path) -> list[str]:
    lines = [
        f"{'what (images/s)':<52} {'bare':>9} {'kdserve':>9} {'kdserve min..max':<19} "
        f"{'ratio':>6}  goal"
    ]

    def add(
        name: str,
        pair: tuple[Callable[[], float], Callable[[], float]],
        where: Callable[[], str] | None = None,
        goal: float | None = GOAL,
    ) -> None:
        """A row: bare and kdserve alternating; ``where`` tells where the time went."""
        started = time.perf_counter()
        bare, ours = alternate(pair, args.repeats, warm_up=True)
        lines.append(ratio_row(name, bare, ours, goal, 52))
        print(f"  {lines[-1]}   ({time.perf_counter() - started:.0f} s)", flush=True)
        if where is not None:
            print(f"      {where()}", flush=True)

    if "teacher" in args.parts:
        for batch in args.batch_sizes:
            t = Teacher(args, images, batch)
            for variant in t.programs:
                add(
                    f"teacher b{batch}: kd.dump, {variant}",
                    (t.bare, partial(t.dump, workdir, variant)),
                    t.where,
                )
            if not args.no_serve:
                add(f"teacher b{batch}: kd.serve -> student process", (t.bare, t.serve), t.where)
            del t
    if "student" in args.parts:
        store = prepare_store(args, workdir)
        pinned = "pinned" if can_pin(torch.device(args.device)) else "unpinned"
        for batch in args.batch_sizes:
            s = StudentRun(args, images, store, batch)
            try:
                add(
                    f"student b{batch}: KnowledgeDataset {pinned}, 0 workers",
                    (s.bare, s.dataset),
                    s.where,
                )
                add(
                    f"student b{batch}: {args.workers} workers, DataLoader {pinned}",
                    (s.bare, s.workers),
                    s.where,
                )
                add(
                    f"  reference: torch alone, {args.workers} workers",
                    (s.bare, s.reference),
                    s.where,
                    goal=None,
                )
            finally:
                s.close()
            del s
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny, 1 repeat: a smoke test")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per side (3)")
    p.add_argument("--images", type=int, default=32768, help="images per pass (32768)")
    p.add_argument("--px", type=int, default=128, help="image side in pixels (128)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 128])
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers (4)")
    p.add_argument(
        "--parts", nargs="+", choices=["teacher", "student"], default=["teacher", "student"]
    )
    p.add_argument("--no-serve", action="store_true", help="skip the kd.serve rows")
    p.add_argument("--small", action="store_true", help="the small conv nets, not ResNets")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.images, args.px, args.batch_sizes, args.small = 1, 512, 32, [64], True
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    vision = "torchvision not importable"
    if torchvision_models() is not None:
        import torchvision

        vision = f"torchvision {torchvision.__version__}"
    print(
        f"kdserve {kd.__version__} on {device_name(device)}; torch {torch.__version__}, "
        f"{vision}, numpy {np.__version__}, pyarrow {pa.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    print(
        f"teacher {net_name('teacher', args)} (bf16 autocast), "
        f"student {net_name('student', args)}; "
        f"{args.images} uint8 images 3x{args.px}x{args.px} per pass, batch sizes "
        f"{args.batch_sizes}, {args.repeats} repeat(s) after a warm-up pass"
    )
    if not can_pin(device):
        print(f"on {device.type}: nothing pinned (pin_memory needs an accelerator)")
    images = make_images(args)
    return run_table("kdserve-gpu-", lambda workdir: run(args, images, workdir))


if __name__ == "__main__":
    sys.exit(main())
