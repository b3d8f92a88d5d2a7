"""``kdserve demo``: an offline distillation round trip on the public API only.

Two teachers (random linear models over a fixed random dataset) each dump their soft
labels to a knowledge store -- one in float16, one top-k coded, reading the data in
different orders -- and a student merges both stores by sample id (mean of the
probabilities), re-batched to its own batch size, shuffled, for two passes. The demo
checks every sample arrives exactly once per pass and compares the merged soft labels
with the exact ensemble.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np

import kdserve as kd

__all__ = ["run_demo"]

_CLASSES = 100
_FEATURES = 64


Program = Callable[[dict[str, Any]], dict[str, np.ndarray]]


def _teacher(seed: int) -> Program:
    """A toy teacher: soft labels softmax(x @ W / 4) of a random linear model."""
    weights = np.random.default_rng(seed).normal(size=(_FEATURES, _CLASSES)).astype(np.float32)

    def program(feed: dict[str, Any]) -> dict[str, np.ndarray]:
        logits = feed["x"] @ weights / 4
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return {"probs": (e / e.sum(axis=1, keepdims=True)).astype(np.float32)}

    return program


def _reader(inputs: np.ndarray, order: np.ndarray) -> Callable[[], Iterator[tuple[Any, ...]]]:
    def samples() -> Iterator[tuple[Any, ...]]:
        for i in order:
            yield inputs[i], i  # the sample id travels with the sample

    return samples


def run_demo(samples: int = 20000, batch_size: int = 256, out: Path | None = None) -> None:
    """Dump two teachers, read them back merged, and print what happened."""
    out = Path(out or "demo-output")
    if out.exists():
        shutil.rmtree(out)
    inputs = np.random.default_rng(0).normal(size=(samples, _FEATURES)).astype(np.float32)
    teachers: dict[str, tuple[Program, np.ndarray, kd.Codec]] = {
        "teacher_a": (_teacher(1), np.arange(samples), kd.Fp16()),
        "teacher_b": (_teacher(2), np.arange(samples)[::-1], kd.TopK(10, kind="probs")),
    }
    rows = []
    for name, (program, order, codec) in teachers.items():
        schema = kd.Schema([kd.Field("probs", "float32", (_CLASSES,), codec=codec)])
        started = time.perf_counter()
        with kd.Teacher(out / name, progress=True) as teacher:
            teacher.start_knowledge_service(
                feed_list=["x", kd.SAMPLE_ID],
                schema=schema,
                program=program,
                reader_config={"sample_generator": _reader(inputs, order), "batch_size": 500},
            )
        seconds = time.perf_counter() - started
        store = kd.StoreReader(out / name)
        rows.append(
            (
                f"{name} dump",
                f"{codec.name}, {store.nbytes / 1e6:.1f} MB",
                f"{samples / seconds:,.0f} samples/s",
            )
        )

    student = kd.Student(merge_strategy={"probs": "mean"}, shuffle=True, seed=0)
    for name in teachers:
        student.register_teacher(in_path=out / name, name=name)
    student.start()
    reader = student.get_knowledge_generator(batch_size=batch_size)
    exact = {name: program({"x": inputs})["probs"] for name, (program, _, _) in teachers.items()}
    for epoch in range(2):
        started = time.perf_counter()
        seen, top1_agree = [], 0
        for batch in reader():
            ids = batch[kd.SAMPLE_ID]
            seen.append(ids)
            ensemble = (exact["teacher_a"][ids] + exact["teacher_b"][ids]) / 2
            top1_agree += int((batch["probs"].argmax(1) == ensemble.argmax(1)).sum())
        seconds = time.perf_counter() - started
        all_ids = np.concatenate(seen)
        if sorted(all_ids.tolist()) != list(range(samples)):
            raise kd.KdserveError(
                f"pass {epoch}: the student did not get every sample exactly once"
            )
        rows.append(
            (
                f"student pass {epoch}",
                f"{len(seen)} batches of {batch_size}, shuffled",
                f"{samples / seconds:,.0f} samples/s",
            )
        )
    rows.append(
        ("top-1 agreement", "merged vs exact ensemble", f"{100 * top1_agree / samples:.2f} %")
    )
    click.echo("\nkdserve demo: 2 teachers -> knowledge stores -> student (merged by sample id)\n")
    for name, what, value in rows:
        click.echo(f"  {name:<17} {what:<34} {value:>18}")
    click.echo(f"\nStores are in {out}/ -- try: kdserve inspect {out}/teacher_b")
