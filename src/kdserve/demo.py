"""``kdserve demo``: two teachers' knowledge through Arrow IPC, merged and re-batched.

Uses only the public API. Two toy teachers (random linear models over random inputs)
encode their logits with different codecs, write them as Arrow IPC streams in their own
batch sizes, and a student reads both back, re-batches to its own size, merges by
sample id and checks the result against the exact ensemble.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import click
import numpy as np
import pyarrow as pa

import kdserve as kd

__all__ = ["run_demo"]

_CLASSES = 10
_FEATURES = 64


def _teacher_stream(
    seed: int, inputs: np.ndarray, batch_size: int, codec: str
) -> tuple[bytes, np.ndarray]:
    """Run a toy teacher over ``inputs``; return its Arrow IPC stream and exact logits."""
    weights = np.random.default_rng(seed).normal(size=(_FEATURES, _CLASSES)).astype(np.float32)
    logits = inputs @ weights
    schema = kd.Schema(
        [kd.Field("logits", "float32", (_CLASSES,), codec=codec)],
        metadata={"teacher": f"linear-{seed}"},
    )
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, schema.to_arrow()) as writer:
        for start in range(0, len(inputs), batch_size):
            rows = slice(start, start + batch_size)
            ids = np.arange(len(inputs))[rows]
            writer.write_batch(kd.to_record_batch({"logits": logits[rows]}, schema, ids))
    return sink.getvalue(), logits


def _read_stream(data: bytes, batch_size: int) -> Iterator[pa.RecordBatch]:
    reader = pa.ipc.open_stream(data)
    return kd.rebatch(reader, batch_size)


def run_demo(samples: int = 2048, batch_size: int = 64) -> None:
    """Print a table comparing the merged knowledge with the exact teacher ensemble."""
    inputs = np.random.default_rng(0).normal(size=(samples, _FEATURES)).astype(np.float32)
    started = time.perf_counter()
    stream_a, exact_a = _teacher_stream(1, inputs, batch_size=50, codec="fp16")
    stream_b, exact_b = _teacher_stream(2, inputs, batch_size=96, codec="bf16")
    schemas = {
        name: kd.Schema.from_arrow(pa.ipc.open_stream(data).schema)
        for name, data in (("a", stream_a), ("b", stream_b))
    }
    merger = kd.Merger(schemas, {"logits": "mean"})
    merged_rows, batches, worst = 0, 0, 0.0
    for batch_a, batch_b in zip(
        _read_stream(stream_a, batch_size), _read_stream(stream_b, batch_size), strict=True
    ):
        merged = merger.merge(
            {"a": kd.from_record_batch(batch_a), "b": kd.from_record_batch(batch_b)}
        )
        ids = merged[kd.SAMPLE_ID]
        exact = (exact_a[ids] + exact_b[ids]) / 2
        worst = max(worst, float(np.abs(merged["logits"] - exact).max()))
        merged_rows += len(ids)
        batches += 1
    elapsed = time.perf_counter() - started
    wire = len(stream_a) + len(stream_b)
    click.echo("kdserve demo: two teachers -> Arrow IPC -> re-batch -> merge (mean)\n")
    rows = [
        ("teacher a", "fp16 logits, batches of 50", f"{len(stream_a) / 1e6:.2f} MB"),
        ("teacher b", "bf16 logits, batches of 96", f"{len(stream_b) / 1e6:.2f} MB"),
        ("student", f"{batches} batches of {batch_size}", f"{merged_rows} samples"),
        ("max |error|", "merged vs exact ensemble", f"{worst:.2e}"),
        ("throughput", "encode+decode+merge", f"{wire / elapsed / 1e6:.1f} MB/s"),
    ]
    for name, what, value in rows:
        click.echo(f"  {name:<12} {what:<30} {value:>12}")
    if merged_rows != samples:
        raise kd.KdserveError(f"the student received {merged_rows} of {samples} samples")
