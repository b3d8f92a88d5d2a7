"""Language-model knowledge on a real LM (issue #11): bytes per token, the error of what
is stored, the CPU a top-k dump costs against the teacher alone, and on-policy scoring
throughput against the teacher alone -- all in one run, on the same windows.

The teacher is the 4-layer causal LM of ``examples/lm_distillation.py``, trained here on
the standard library's sources (its BPE vocabulary too). Measured:

* **size and error**: top-k of every position stored as fp16 or uint8 log-probabilities,
  with and without zstd, and top-p (at most k entries); bytes of the knowledge shards per
  token, and the mean KL (nats/token) between the exact top-k distribution (the teacher's
  top-k probabilities plus a tail bucket, float64) and the stored one;
* **dump CPU**: process CPU time (all threads) per token of ``kd.dump`` with top-k on the
  teacher's device (``teacher_program(topk=...)``) against the teacher alone (the module
  over the same batches, logits to numpy), medians of ``--repeats`` alternating runs;
* **on-policy**: the student's ``query_stream(decode=False)`` of ragged token sequences
  to a served teacher, tokens/s against the teacher alone over the same sequences.

    python benchmarks/lm_bench.py            # about 2 minutes on 2 cores
    python benchmarks/lm_bench.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from report import alternate, fmt, run_table, store_bytes, timed

import kdserve as kd
from kdserve.torch import teacher_program

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import lm_distillation as lm


def exact_top_k(model: torch.nn.Module, windows: list[np.ndarray], k: int) -> np.ndarray:
    """Per token: the teacher's k largest probabilities and the tail, float64."""
    rows = []
    with torch.inference_mode():
        for batch in lm.batches(windows, 64):
            tokens, mask = lm.padded(batch["tokens"])
            log_p = torch.log_softmax(model(tokens).double(), -1)[mask]
            top = torch.topk(log_p, k, -1).values.exp()
            rows.append(torch.cat([top, (1 - top.sum(-1, keepdim=True)).clamp_min(0)], -1))
    return torch.cat(rows).numpy()


def stored_kl(path: Path, exact: np.ndarray) -> float:
    """Mean KL per token, in nats, between the exact and the stored distribution over the
    classes stored at each position plus one bucket for all others (the tail; for top-p,
    the slots a position left unused join it): the error of what was stored."""
    reader = kd.StoreReader(path)
    parts = kd.from_record_batch(reader.read(0, len(reader)), decode=False)["logits"]
    values = parts["values"].values.astype(np.float64)
    kept = np.isfinite(values)
    tail = parts["tail"].values.astype(np.float64)[:, None]
    probs = np.exp(np.where(kept, values - values[:, :1], -np.inf))
    got = np.concatenate([probs / probs.sum(-1, keepdims=True) * (1 - tail), tail], -1)
    top = np.where(kept, exact[:, :-1], 0.0)
    want = np.concatenate([top, 1 - top.sum(-1, keepdims=True)], -1).clip(0, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(want > 0, want * (np.log(want) - np.log(got)), 0.0)
    return float(terms.sum(-1).mean())


def coded(model: torch.nn.Module, k: int) -> Any:
    """The teacher with its top-k computed where its logits are."""
    return teacher_program(model, inputs=["tokens"], devices=["cpu"], topk={"logits": k})


def sizes(
    args: argparse.Namespace, model: Any, windows: list[np.ndarray], workdir: Path
) -> list[str]:
    """Bytes/token and KL of each way to store top-k."""
    tokens = sum(map(len, windows))
    lines = [f"{'stored top-k (knowledge only)':<34} {'B/token':>8} {'KL nats/token':>14}"]
    for k in args.k:
        exact = exact_top_k(model, windows, k)
        variants = [
            (f"top-{k} {name} {compression or ''}", kd.TopK(k, values=values), dtype, compression)
            for name, values, dtype in (("fp16", "float", "float16"), ("uint8", "uint8", "float32"))
            for compression in (None, "zstd")
        ]
        top_p = kd.TopK(k, values="uint8", p=args.top_p)
        variants.append((f"top-p {args.top_p} (k <= {k}) uint8 zstd", top_p, "float32", "zstd"))
        for i, (name, codec, dtype, compression) in enumerate(variants):
            keep = kd.Schema([kd.Field("logits", dtype, (None, args.vocab), codec=codec)])
            path = workdir / f"size-{k}-{i}"
            kd.dump(
                coded(model, k),
                lm.batches(windows, args.batch),
                path,
                keep=keep,
                compression=compression,
                progress=False,
            )
            lines.append(
                f"{name:<34} {store_bytes(path) / tokens:>8.1f} {stored_kl(path, exact):>14.2e}"
            )
    return lines


def dump_cpu(
    args: argparse.Namespace, model: Any, windows: list[np.ndarray], workdir: Path
) -> list[str]:
    """CPU time per token of a top-k dump against the teacher alone."""
    data = lm.batches(windows, args.batch)
    tokens = sum(map(len, windows))
    program = teacher_program(model, inputs=["tokens"], devices=["cpu"])

    def alone() -> float:
        return timed(lambda: [program(batch) for batch in data])

    lines = [
        f"{'dump CPU (top-k on the device)':<34} {'us/token':>8} {'x teacher':>10} {'x +top-k':>9}"
    ]
    for k in args.k:
        keep = kd.Schema(
            [kd.Field("logits", "float32", (None, args.vocab), codec=kd.TopK(k, values="uint8"))]
        )
        path, top = workdir / f"cpu-{k}", coded(model, k)

        def with_top_k(top: Any = top) -> float:  # the device's share: model + top-k
            return timed(lambda: [top(batch) for batch in data])

        def dump(top: Any = top, keep: Any = keep, path: Path = path) -> float:
            return timed(
                lambda: kd.dump(top, data, path, keep=keep, overwrite=True, progress=False)
            )

        bare, ours = alternate((alone, dump), args.repeats)
        device, again = alternate((with_top_k, dump), args.repeats)
        base, cost = statistics.median(bare), statistics.median(ours)
        device_cost, cost_again = statistics.median(device), statistics.median(again)
        if k == args.k[0]:
            lines.append(f"{'teacher alone':<34} {fmt(base / tokens * 1e6):>8} {'1.00':>10}")
        lines.append(
            f"{f'teacher + top-{k} (device work)':<34} {fmt(device_cost / tokens * 1e6):>8} "
            f"{device_cost / base:>10.3f} {'1.00':>9}"
        )
        lines.append(
            f"{f'kd.dump top-{k} uint8':<34} {fmt(cost / tokens * 1e6):>8} {cost / base:>10.3f} "
            f"{cost_again / device_cost:>9.3f}"
        )
    return lines


def on_policy(args: argparse.Namespace, model: Any, windows: list[np.ndarray]) -> list[str]:
    """Tokens/s of query-mode scoring of ragged sequences against the teacher alone."""
    data = [{"tokens": b["tokens"]} for b in lm.batches(windows, args.batch)]
    tokens = sum(map(len, windows))
    k = args.k[0]
    top = coded(model, k)
    keep = kd.Schema([kd.Field("logits", "float32", (None, args.vocab), codec=kd.TopK(k))])

    def alone() -> float:
        start = time.perf_counter()
        for batch in data:
            top(batch)
        return tokens / (time.perf_counter() - start)

    with (
        kd.serve(top, None, feeds=["tokens"], keep=keep, progress=False) as service,
        kd.Student(connect_timeout=30.0) as student,
    ):
        student.add_teacher(service.address)

        def asked() -> float:
            start = time.perf_counter()
            for _ in student.query_stream(0, data, max_in_flight=4, decode=False):
                pass
            return tokens / (time.perf_counter() - start)

        bare, ours = alternate((alone, asked), args.repeats)
    base, rate = statistics.median(bare), statistics.median(ours)
    return [
        f"{'on-policy scoring (top-' + str(k) + ')':<34} {'tokens/s':>8} {'x teacher':>10}",
        f"{'teacher alone':<34} {fmt(base):>8} {'1.00':>10}",
        f"{'query_stream(decode=False)':<34} {fmt(rate):>8} {rate / base:>10.3f}",
    ]


def run(args: argparse.Namespace, workdir: Path) -> list[str]:
    s = dataclasses.replace(lm.SMALL, vocab=args.vocab, teacher_steps=args.teacher_steps)
    texts = lm.documents(s.chars)
    tokenizer = lm.bpe(texts, s.vocab)
    windows = lm.windows(tokenizer, texts, s.seq)[: args.windows]
    model = lm.train_teacher(s, windows)
    return [
        *sizes(args, model, windows, workdir),
        "",
        *dump_cpu(args, model, windows, workdir),
        "",
        *on_policy(args, model, windows),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny and untrained: a smoke test")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--windows", type=int, default=400, help="token windows of 64 measured")
    p.add_argument("--batch", type=int, default=32, help="windows per batch")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--k", type=int, nargs="+", default=[16, 64])
    p.add_argument("--top-p", type=float, default=0.95, help="p of the top-p rows")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.windows, args.vocab, args.teacher_steps, args.k = 1, 40, 512, 2, [16]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"kdserve {kd.__version__}, torch {torch.__version__}; 4-layer LM teacher, vocabulary "
        f"{args.vocab}, {args.windows} windows of up to 64 tokens, {args.repeats} repeat(s)"
    )
    return run_table("kdserve-lm-", lambda workdir: run(args, workdir))


if __name__ == "__main__":
    sys.exit(main())
