"""Host-side codec cost on language-model knowledge (issue #11): ``to_record_batch`` of
sequences of ``(length, vocab)`` float32 logits through each codec, against the one numpy
operation a hand-written version needs over the same data -- ``np.argpartition`` for
``TopK``, ``astype(np.float16)`` for the casts and for no codec. Medians of
``--repeats`` alternating runs; the goal is at most 2x.

    python benchmarks/codec_bench.py            # seconds
    python benchmarks/codec_bench.py --torch    # with torch loaded: its float16 casts
    python benchmarks/codec_bench.py --quick    # smoke test

With ``--torch`` the process imports PyTorch first, as a PyTorch user's does: kdserve's
float16 casts (the fp16 codec) then go through torch's vectorised ones; the baseline stays
numpy's ``astype``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from report import alternate, fmt, run_table

import kdserve as kd


def seconds(fn: Callable[[], Any]) -> Callable[[], float]:
    """``fn`` as a callable returning its wall time."""

    def timed() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return timed


def run(args: argparse.Namespace, _: Path) -> list[str]:
    rng = np.random.default_rng(0)
    seqs = [
        (rng.standard_normal((args.length, args.vocab)) * 3).astype(np.float32)
        for _ in range(args.seqs)
    ]
    flat = np.concatenate(seqs)
    ids = np.arange(args.seqs)
    partition = seconds(lambda: np.argpartition(flat, args.vocab - 64, axis=-1))
    cast = seconds(lambda: flat.astype(np.float16))
    lines = [
        f"{'codec':<22} {'baseline':<16} {'base ms':>8} {'codec ms':>9} {'ratio':>6}  goal <= 2"
    ]
    cases: list[tuple[str, Any, str, Callable[[], float]]] = [
        ("none", None, "astype(float16)", cast),
        ("fp16", "fp16", "astype(float16)", cast),
        ("bf16", "bf16", "astype(float16)", cast),
        ("TopK(16)", kd.TopK(16), "argpartition", partition),
        ("TopK(64)", kd.TopK(64), "argpartition", partition),
        ("TopK(64, uint8)", kd.TopK(64, values="uint8"), "argpartition", partition),
    ]
    for name, codec, label, baseline in cases:
        schema = kd.Schema([kd.Field("logits", "float32", (None, args.vocab), codec=codec)])
        ours = seconds(lambda schema=schema: kd.to_record_batch({"logits": seqs}, schema, ids))
        bare, coded = alternate((baseline, ours), args.repeats, warm_up=True)
        base, cost = statistics.median(bare), statistics.median(coded)
        verdict = "PASS" if cost / base <= 2 else "FAIL"
        lines.append(
            f"{name:<22} {label:<16} {fmt(base * 1e3):>8} {fmt(cost * 1e3):>9} "
            f"{cost / base:>6.2f}  {verdict}"
        )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small, 1 repeat: a smoke test")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--seqs", type=int, default=4, help="sequences per batch")
    p.add_argument("--length", type=int, default=50, help="tokens per sequence")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--torch", action="store_true", help="import torch first (float16 casts)")
    args = p.parse_args(argv)
    if args.torch:
        import torch  # noqa: F401  (loaded: kdserve.core.half casts through it)
    if args.quick:
        args.repeats, args.vocab = 1, 1000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"kdserve {kd.__version__}, numpy {np.__version__}; {args.seqs} sequences x "
        f"{args.length} tokens x vocabulary {args.vocab} (float32), {args.repeats} repeats"
        f"{', torch loaded' if args.torch else ''}"
    )
    return run_table("kdserve-codec-", lambda workdir: run(args, workdir))


if __name__ == "__main__":
    sys.exit(main())
