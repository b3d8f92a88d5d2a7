"""Benchmark of the kdserve knowledge store against raw ``.npy`` and pickle-stream baselines.

For knowledge batches of about 1 MB and 32 MB (float32 logits of shape ``(rows, 1000)``
plus the int64 ``sample_id`` column) it measures:

* write throughput: ``StoreWriter`` (crc32 + fsync, ``close()`` included) against
  ``np.save`` of the same arrays into one file + fsync, and against a pickle stream +
  fsync (how the older Pantheon toolkit stored knowledge); and, as a reference without
  durability, ``np.save`` without fsync and the store with ``os.fsync`` made a no-op
  (the store's own CPU and page-cache cost, which fsync noise would otherwise hide);
* sequential read throughput: ``iter_range`` + ``from_record_batch`` against the ``.npy``
  file memory-mapped and fully loaded, the pickle stream, and a plain memcpy;
* random access latency: one random batch-sized row range with ``StoreReader.read`` +
  ``from_record_batch``, against ``.npy`` mmap slicing and pickle (which must read from
  the front of the stream to reach batch ``i``);
* the cost of checked reads: a first pass over a freshly opened store with
  ``StoreReader(verify=True)`` (each shard's crc32 checked before its first use) against
  the same pass with ``verify=False``.

Every reader "touches" what it gets: it sums one value per 4 KiB page of the logits and
one per page of the sample ids (``--touch full`` sums every value), so lazily mapped
pages are paid for the same way as eagerly read ones. Random-access latencies do not
touch: they time how long it takes to get the arrays (zero-copy for mmap readers).

Throughput is knowledge bytes (logits + sample ids, 1 MB = 10**6 bytes) per second. Each
measurement is repeated (``--repeats``, default 5) in rotating method order; the table
shows the median, the min..max spread and kdserve's value divided by each method's.
Scratch files go to a temporary directory next to the repository (``--dir``) and are
removed at the end.

    python benchmarks/store_bench.py            # full run, under a minute on 2 cores
    python benchmarks/store_bench.py --quick    # smoke test, a few seconds
    python benchmarks/store_bench.py --checked-read   # only the verify=True cost, seconds
"""

from __future__ import annotations

import argparse
import mmap
import os
import pickle  # Only as a comparison baseline (Pantheon's format); kdserve's src/ never pickles.
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import pyarrow as pa
from report import fmt

import kdserve
from kdserve.store import DEFAULT_SHARD_BYTES

MB = 1_000_000
WIDTH = 1000  # logits per sample
ROW_BYTES = 4 * WIDTH + 8  # float32 logits + int64 sample id
PAGE = 4096
WRITE_GOAL = 0.7  # store write >= 0.7x raw .npy write with fsync
LATENCY_GOAL_MS = 1.0  # random batch read < 1 ms

Arrays = dict[str, np.ndarray]
T = TypeVar("T")

# Method names, as printed.
W_STORE = "kdserve StoreWriter (crc32+fsync)"
W_NPY = "npy np.save + fsync"
W_NPY_NOSYNC = "npy np.save, no fsync"
W_STORE_NOSYNC = "kdserve StoreWriter, fsync off (diag)"
W_PICKLE = "pickle.dump + fsync (Pantheon)"
R_STORE = "kdserve iter_range+from_record_batch"
R_NPY_MMAP = "npy mmap_mode='r' views"
R_NPY_LOAD = "npy np.load (full copy)"
R_PICKLE = "pickle.load stream"
R_MEMCPY = "memcpy np.copyto (ref)"
A_STORE = "kdserve read+from_record_batch"
A_NPY = "npy mmap slice"
A_PICKLE = "pickle: load from front to batch i"
R_CHECKED = "kdserve StoreReader(verify=True)"
R_UNCHECKED = "kdserve StoreReader(verify=False)"
CHECKED_TITLE = "first pass, crc32 checked vs not"
O_STORE = "kdserve StoreReader() + first read"
O_NPY = "npy header scan + mmap + slice"


@dataclass
class Case:
    """One batch size: the batches a teacher produced, as numpy arrays."""

    label: str
    rows: int
    batches: list[Arrays]

    @property
    def total_rows(self) -> int:
        return self.rows * len(self.batches)

    @property
    def nbytes(self) -> int:
        return self.total_rows * ROW_BYTES


@dataclass
class Group:
    """One measurement (a table section) of one case: values per method, per repeat.

    ``methods`` fixes the order of the rows; the first is kdserve's, the one the others
    are compared with.
    """

    title: str
    unit: str
    methods: list[str]
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, method: str, value: float) -> None:
        self.values.setdefault(method, []).append(value)

    def median(self, method: str) -> float:
        return statistics.median(self.values[method])


def make_case(batch_mb: float, total_mb: float, seed: int) -> Case:
    """Random logits in batches of about ``batch_mb`` MB, about ``total_mb`` MB in all."""
    rows = max(1, round(batch_mb * MB / ROW_BYTES))
    count = max(2, round(total_mb / batch_mb))
    rng = np.random.default_rng(seed)
    batches = [
        {
            "sample_id": np.arange(i * rows, (i + 1) * rows, dtype=np.int64),
            "logits": rng.random((rows, WIDTH), dtype=np.float32),
        }
        for i in range(count)
    ]
    return Case(f"{batch_mb:g}MB", rows, batches)


def touch(arrays: Mapping[str, np.ndarray], full: bool) -> float:
    """Read the arrays: one value per 4 KiB page, or every value when ``full``."""
    logits = arrays["logits"].reshape(-1)
    ids = arrays["sample_id"]
    if full:
        return float(np.add.reduce(logits)) + float(np.add.reduce(ids))
    return float(logits[:: PAGE // 4].sum()) + float(ids[:: PAGE // 8].sum())


def fsync_file(f: BinaryIO) -> None:
    """Flush a Python file object and fsync it to disk."""
    f.flush()
    os.fsync(f.fileno())


def evict(paths: list[Path]) -> None:
    """Drop the files' (clean) pages from the page cache, for cold reads."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def store_files(path: Path) -> list[Path]:
    """Every file of the store at ``path``."""
    return sorted(p for p in path.iterdir() if p.is_file())


# --- writers: each returns seconds -----------------------------------------------------


def write_store(path: Path, case: Case, schema: kdserve.Schema, shard_bytes: int) -> float:
    """Numpy arrays -> durable store: to_record_batch, write, close (shard fsyncs)."""
    t0 = time.perf_counter()
    writer = kdserve.StoreWriter(path, schema, shard_bytes=shard_bytes)
    for b in case.batches:
        writer.write(kdserve.to_record_batch({"logits": b["logits"]}, schema, b["sample_id"]))
    writer.close()
    return time.perf_counter() - t0


def write_npy(path: Path, case: Case, sync: bool) -> float:
    """``np.save`` of each batch's sample ids then logits, into one file."""
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for b in case.batches:
            np.save(f, b["sample_id"])
            np.save(f, b["logits"])
        if sync:
            fsync_file(f)
    return time.perf_counter() - t0


def write_pickle(path: Path, case: Case) -> float:
    """One ``pickle.dump`` of each batch dict into one file (the Pantheon way), fsynced."""
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for b in case.batches:
            pickle.dump(b, f, protocol=pickle.HIGHEST_PROTOCOL)
        fsync_file(f)
    return time.perf_counter() - t0


# --- readers ---------------------------------------------------------------------------


class NpyMmap:
    """The arrays of a multi-array ``.npy`` file, memory-mapped, sliceable by row range.

    ``np.load(path, mmap_mode="r")`` maps only a file's first array, so this does what it
    does for each array in turn: parse the header, map the data (one mapping per file).
    """

    def __init__(self, path: Path) -> None:
        fmt = np.lib.format
        spans: list[tuple[int, tuple[int, ...], np.dtype]] = []
        size = path.stat().st_size
        with open(path, "rb") as f:
            while f.tell() < size:
                version = fmt.read_magic(f)
                read_header = (
                    fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                )
                shape, _, dtype = read_header(f)
                start = f.tell()
                spans.append((start, shape, dtype))
                f.seek(start + int(np.prod(shape)) * dtype.itemsize)
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        views = [
            np.frombuffer(self._map, dtype, int(np.prod(shape)), start).reshape(shape)
            for start, shape, dtype in spans
        ]
        self.batches = [
            {"sample_id": ids, "logits": logits}
            for ids, logits in zip(views[::2], views[1::2], strict=True)
        ]
        self.starts = np.cumsum([0] + [len(b["sample_id"]) for b in self.batches])

    def read(self, start: int, stop: int) -> Arrays:
        """Rows ``[start, stop)``: views of one batch, or a concatenated copy across two."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop - 1, side="right")) - 1
        parts: list[Arrays] = []
        for i in range(first, last + 1):
            lo = max(start, int(self.starts[i])) - int(self.starts[i])
            hi = min(stop, int(self.starts[i + 1])) - int(self.starts[i])
            parts.append({k: v[lo:hi] for k, v in self.batches[i].items()})
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def iter_npy_load(path: Path, count: int) -> Iterator[Arrays]:
    """Each batch of a multi-array ``.npy`` file, read fully into memory with ``np.load``."""
    with open(path, "rb") as f:
        for _ in range(count):
            ids = np.load(f, allow_pickle=False)
            logits = np.load(f, allow_pickle=False)
            yield {"sample_id": ids, "logits": logits}


def iter_pickle(path: Path) -> Iterator[Arrays]:
    """Each batch dict of a pickle stream, in order."""
    with open(path, "rb") as f:
        while True:
            try:
                yield pickle.load(f)
            except EOFError:
                return


def read_store(path: Path, schema: kdserve.Schema, full: bool, verify: bool = False) -> float:
    """Seconds to open the store and read (and touch) every batch in order."""
    t0 = time.perf_counter()
    reader = kdserve.StoreReader(path, verify=verify)
    for b in reader.iter_range():
        touch(kdserve.from_record_batch(b, schema), full)
    return time.perf_counter() - t0


def read_npy_mmap(path: Path, full: bool) -> float:
    """Seconds to map the ``.npy`` file and touch every batch."""
    t0 = time.perf_counter()
    npy = NpyMmap(path)
    for b in npy.batches:
        touch(b, full)
    return time.perf_counter() - t0


def read_npy_load(path: Path, count: int, full: bool) -> float:
    """Seconds to ``np.load`` every batch and touch it."""
    t0 = time.perf_counter()
    for b in iter_npy_load(path, count):
        touch(b, full)
    return time.perf_counter() - t0


def read_pickle(path: Path, full: bool) -> float:
    """Seconds to unpickle every batch and touch it."""
    t0 = time.perf_counter()
    for b in iter_pickle(path):
        touch(b, full)
    return time.perf_counter() - t0


def read_memcpy(case: Case, dst: Arrays, full: bool) -> float:
    """Seconds to copy every batch into a preallocated array and touch the copy."""
    t0 = time.perf_counter()
    row = 0
    for b in case.batches:
        n = len(b["sample_id"])
        out = {k: dst[k][row : row + n] for k in b}
        for k, v in b.items():
            np.copyto(out[k], v)
        touch(out, full)
        row += n
    return time.perf_counter() - t0


# --- random access: each returns per-read seconds -----------------------------------------


def random_store(path: Path, schema: kdserve.Schema, starts: np.ndarray, rows: int) -> list[float]:
    """Latency of ``reader.read(s, s + rows)`` + ``from_record_batch`` for each start."""
    reader = kdserve.StoreReader(path)
    out = []
    for s in starts.tolist():
        t0 = time.perf_counter()
        kdserve.from_record_batch(reader.read(s, s + rows), schema)
        out.append(time.perf_counter() - t0)
    return out


def random_npy(path: Path, starts: np.ndarray, rows: int) -> list[float]:
    """Latency of slicing rows ``[s, s + rows)`` out of the mapped ``.npy`` file."""
    npy = NpyMmap(path)
    out = []
    for s in starts.tolist():
        t0 = time.perf_counter()
        npy.read(s, s + rows)
        out.append(time.perf_counter() - t0)
    return out


def random_pickle(path: Path, indices: np.ndarray) -> list[float]:
    """Latency of reaching batch ``i`` of the pickle stream (it loads batches 0..i)."""
    out = []
    for i in indices.tolist():
        t0 = time.perf_counter()
        for j, _ in enumerate(iter_pickle(path)):
            if j == i:
                break
        out.append(time.perf_counter() - t0)
    return out


def open_store(path: Path, schema: kdserve.Schema, start: int, rows: int) -> float:
    """Seconds to open the store and read one batch (builds that shard's batch index)."""
    t0 = time.perf_counter()
    kdserve.from_record_batch(kdserve.StoreReader(path).read(start, start + rows), schema)
    return time.perf_counter() - t0


def open_npy(path: Path, start: int, rows: int) -> float:
    """Seconds to scan the ``.npy`` headers, map the file and slice one batch."""
    t0 = time.perf_counter()
    NpyMmap(path).read(start, start + rows)
    return time.perf_counter() - t0


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


# --- the benchmark -----------------------------------------------------------------------


def rotate(items: list[T], k: int) -> list[T]:
    """``items`` started at position ``k``, so no method always runs first."""
    k %= len(items)
    return items[k:] + items[:k]


@dataclass(frozen=True)
class Files:
    """Where one case's outputs go."""

    store: Path
    npy: Path
    npy_nosync: Path
    pkl: Path
    scratch: Path

    @classmethod
    def under(cls, workdir: Path) -> Files:
        return cls(
            workdir / "store",
            workdir / "batches.npy",
            workdir / "nosync.npy",
            workdir / "batches.pkl",
            workdir / "store-nosync",
        )

    def remove(self, path: Path) -> None:
        """Delete one output (file or store directory) if it exists."""
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def cached(self) -> list[Path]:
        """The files the readers read (for ``--cold`` eviction)."""
        return [*store_files(self.store), self.npy, self.pkl]


@contextmanager
def fsync_disabled() -> Iterator[None]:
    """Make ``os.fsync`` a no-op (diagnostic only: what the store costs without durability)."""
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real


def write_store_nosync(path: Path, case: Case, schema: kdserve.Schema, shard_bytes: int) -> float:
    """:func:`write_store` with fsync disabled: the store's CPU and page-cache cost."""
    with fsync_disabled():
        return write_store(path, case, schema, shard_bytes)


def shard_size(args: argparse.Namespace) -> int:
    """The store's shard size bound: ``--shard-mb``, else the library's default."""
    return int(args.shard_mb * MB) if args.shard_mb else DEFAULT_SHARD_BYTES


def bench_writes(case: Case, args: argparse.Namespace, files: Files) -> list[Group]:
    """Write throughput; the last repeat's store, .npy and pickle files stay for the reads.

    One untimed warm-up round comes first: the first writes after a quiet spell are
    often several times slower on this kind of virtual disk.
    """
    schema = case_schema()
    durable = Group("write, durable (fsync)", "MB/s", [W_STORE, W_NPY, W_PICKLE])
    cached = Group(
        "write to page cache (no fsync; reference)", "MB/s", [W_STORE_NOSYNC, W_NPY_NOSYNC]
    )
    writers: dict[str, tuple[Group, Path, Callable[[], float]]] = {
        W_STORE: (
            durable,
            files.store,
            lambda: write_store(files.store, case, schema, shard_size(args)),
        ),
        W_NPY: (durable, files.npy, lambda: write_npy(files.npy, case, sync=True)),
        W_PICKLE: (durable, files.pkl, lambda: write_pickle(files.pkl, case)),
        W_STORE_NOSYNC: (
            cached,
            files.scratch,
            lambda: write_store_nosync(files.scratch, case, schema, shard_size(args)),
        ),
        W_NPY_NOSYNC: (cached, files.npy_nosync, lambda: write_npy(files.npy_nosync, case, False)),
    }
    for rep in range(-1, args.repeats):
        for method in rotate(list(writers), rep):
            group, out, run = writers[method]
            files.remove(out)  # each method starts from nothing, with the disk settled
            os.sync()
            seconds = run()
            if rep >= 0:
                group.add(method, case.nbytes / MB / seconds)
    files.remove(files.npy_nosync)
    files.remove(files.scratch)
    os.sync()
    return [durable, cached]


def bench_reads(case: Case, args: argparse.Namespace, files: Files) -> Group:
    """Sequential read throughput of the whole data set."""
    schema = case_schema()
    full = args.touch == "full"
    dst = {k: np.ones((case.total_rows, *v.shape[1:]), v.dtype) for k, v in case.batches[0].items()}
    group = Group("sequential read", "MB/s", [R_STORE, R_NPY_MMAP, R_NPY_LOAD, R_PICKLE, R_MEMCPY])
    readers: dict[str, Callable[[], float]] = {
        R_STORE: lambda: read_store(files.store, schema, full),
        R_NPY_MMAP: lambda: read_npy_mmap(files.npy, full),
        R_NPY_LOAD: lambda: read_npy_load(files.npy, len(case.batches), full),
        R_PICKLE: lambda: read_pickle(files.pkl, full),
        R_MEMCPY: lambda: read_memcpy(case, dst, full),
    }
    for rep in range(args.repeats):
        for method in rotate(list(readers), rep):
            if args.cold:
                evict(files.cached())
            group.add(method, case.nbytes / MB / readers[method]())
    return group


def bench_checked_reads(case: Case, args: argparse.Namespace, files: Files) -> Group:
    """First pass over a freshly opened store, each shard's crc32 checked first or not."""
    schema = case_schema()
    full = args.touch == "full"
    group = Group(CHECKED_TITLE, "MB/s", [R_CHECKED, R_UNCHECKED])
    readers: dict[str, Callable[[], float]] = {
        R_CHECKED: lambda: read_store(files.store, schema, full, verify=True),
        R_UNCHECKED: lambda: read_store(files.store, schema, full, verify=False),
    }
    for rep in range(args.repeats):
        for method in rotate(list(readers), rep):
            if args.cold:
                evict(files.cached())
            group.add(method, case.nbytes / MB / readers[method]())
    return group


def bench_random(case: Case, args: argparse.Namespace, files: Files) -> list[Group]:
    """Random access latencies: per-repeat median and p95 of many reads, and open cost."""
    schema = case_schema()
    rng = np.random.default_rng(args.seed + 1)
    rows, count = case.rows, len(case.batches)
    store, npy = files.store, files.npy
    aligned = [A_STORE, A_NPY, A_PICKLE]
    aligned_med = Group("random batch (stored-batch aligned), median", "ms", aligned)
    aligned_p95 = Group("random batch (stored-batch aligned), p95", "ms", aligned)
    any_med = Group("random batch-sized row range (any offset), median", "ms", [A_STORE, A_NPY])
    any_p95 = Group("random batch-sized row range (any offset), p95", "ms", [A_STORE, A_NPY])
    opened = Group("open + first random batch", "ms", [O_STORE, O_NPY])
    for rep in range(args.repeats):
        starts = rng.integers(0, count, args.random_reads) * rows
        anywhere = rng.integers(0, case.total_rows - rows + 1, args.random_reads)
        reach = rng.integers(0, count, args.pickle_reads)
        first = int(starts[0])
        lat: dict[tuple[str, str], Callable[[], list[float]]] = {
            ("aligned", A_STORE): lambda a=starts: random_store(store, schema, a, rows),
            ("aligned", A_NPY): lambda a=starts: random_npy(npy, a, rows),
            ("aligned", A_PICKLE): lambda r=reach: random_pickle(files.pkl, r),
            ("any", A_STORE): lambda a=anywhere: random_store(store, schema, a, rows),
            ("any", A_NPY): lambda a=anywhere: random_npy(npy, a, rows),
            ("open", O_STORE): lambda s=first: [open_store(store, schema, s, rows)],
            ("open", O_NPY): lambda s=first: [open_npy(npy, s, rows)],
        }
        for kind, method in rotate(list(lat), rep):
            if args.cold:
                evict(files.cached())
            ms = [1e3 * t for t in lat[(kind, method)]()]
            if kind == "aligned":
                aligned_med.add(method, statistics.median(ms))
                aligned_p95.add(method, p95(ms))
            elif kind == "any":
                any_med.add(method, statistics.median(ms))
                any_p95.add(method, p95(ms))
            else:
                opened.add(method, ms[0])
    return [aligned_med, aligned_p95, any_med, any_p95, opened]


def case_schema() -> kdserve.Schema:
    """The knowledge schema of every case: one float32 logits field of width 1000."""
    return kdserve.Schema([kdserve.Field("logits", "float32", (WIDTH,))])


def run_case(case: Case, args: argparse.Namespace, workdir: Path) -> list[Group]:
    """All measurements of one case; leaves nothing behind in ``workdir``."""
    files = Files.under(workdir)
    try:
        if args.checked_read:  # only what the checked-read comparison needs
            write_store(files.store, case, case_schema(), shard_size(args))
            return [bench_checked_reads(case, args, files)]
        writes = bench_writes(case, args, files)
        read = bench_reads(case, args, files)
        checked = bench_checked_reads(case, args, files)
        return [*writes, read, checked, *bench_random(case, args, files)]
    finally:
        for p in (files.store, files.npy, files.npy_nosync, files.pkl, files.scratch):
            files.remove(p)


def table(results: dict[str, list[Group]]) -> list[str]:
    """The results as aligned text: one line per (case, measurement, method)."""
    header = ("size", "measurement", "method", "median", "min..max", "unit", "kdserve/this")
    rows: list[tuple[str, ...]] = []
    for label, groups in results.items():
        for g in groups:
            ours = g.median(g.methods[0])
            for m in g.methods:
                vals = g.values[m]
                med = statistics.median(vals)
                ratio = "" if m == g.methods[0] else f"{ours / med:.2f}x"
                spread = f"{fmt(min(vals))}..{fmt(max(vals))}"
                rows.append((label, g.title, m, fmt(med), spread, g.unit, ratio))
        rows.append(("",) * len(header))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {3, 4, 6}

    def line(r: tuple[str, ...]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    out = [line(header), line(tuple("-" * w for w in widths))]
    out += [line(r) for r in rows[:-1]]
    out.append(
        "kdserve/this = kdserve's median / this method's median "
        "(MB/s: > 1 means kdserve is faster; ms: < 1 means kdserve is faster)"
    )
    return out


def goals(results: dict[str, list[Group]]) -> list[tuple[str, bool]]:
    """The issue's goals, each with PASS (True) or FAIL."""
    out = []
    for label, groups in results.items():
        by_title = {g.title: g for g in groups}
        if "write, durable (fsync)" not in by_title:
            continue
        w = by_title["write, durable (fsync)"]
        ratio = w.median(W_STORE) / w.median(W_NPY)
        out.append(
            (
                f"{label}: store write >= {WRITE_GOAL}x npy write with fsync ({ratio:.2f}x)",
                ratio >= WRITE_GOAL,
            )
        )
        for title, what in (
            ("random batch (stored-batch aligned), median", "random batch read"),
            ("random batch-sized row range (any offset), median", "extra: any-offset row range"),
        ):
            ms = by_title[title].median(A_STORE)
            out.append(
                (
                    f"{label}: {what} < {LATENCY_GOAL_MS:g} ms (median {ms:.3f} ms)",
                    ms < LATENCY_GOAL_MS,
                )
            )
    return out


def checked_read_costs(results: dict[str, list[Group]]) -> list[str]:
    """What checking crc32s costs a first pass: verify=True time over verify=False time."""
    out = []
    for label, groups in results.items():
        for g in groups:
            if g.title == CHECKED_TITLE:
                # Medians of MB/s: the time ratio is unchecked over checked throughput.
                cost = g.median(R_UNCHECKED) / g.median(R_CHECKED)
                out.append(
                    f"{label}: a verify=True first pass takes {cost:.2f}x the time of a "
                    f"verify=False one (median of {len(g.values[R_CHECKED])} repeats)"
                )
    return out


def default_dir() -> Path:
    """A scratch directory next to the repository (same filesystem as the work tree)."""
    parent = Path(__file__).resolve().parents[2]
    return parent if os.access(parent, os.W_OK) else Path(tempfile.gettempdir())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None, help="repeats per measurement (5)")
    p.add_argument("--quick", action="store_true", help="small data, 2 repeats: a smoke test")
    p.add_argument("--batch-mb", type=float, nargs="+", default=[1.0, 32.0], help="batch sizes")
    p.add_argument("--total-mb", type=float, default=None, help="MB written per case (512)")
    p.add_argument("--random-reads", type=int, default=None, help="random reads per repeat (200)")
    p.add_argument("--pickle-reads", type=int, default=None, help="pickle reaches per repeat (5)")
    p.add_argument("--shard-mb", type=float, default=None, help="store shard size (library's)")
    p.add_argument("--touch", choices=["page", "full"], default="page", help="how reads touch")
    p.add_argument("--cold", action="store_true", help="evict files from page cache before reads")
    p.add_argument("--dir", type=Path, default=None, help="scratch parent dir (next to the repo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--checked-read",
        action="store_true",
        help="only the StoreReader(verify=True) vs verify=False first-pass comparison",
    )
    args = p.parse_args(argv)
    for name in ("repeats", "random_reads", "pickle_reads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    quick = args.quick
    args.repeats = args.repeats or (2 if quick else 5)
    args.total_mb = args.total_mb or (64.0 if quick else 256.0 if args.checked_read else 512.0)
    args.random_reads = args.random_reads or (50 if quick else 200)
    args.pickle_reads = args.pickle_reads or (2 if quick else 5)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every case, print the table and the goals."""
    args = parse_args(argv)
    parent = args.dir or default_dir()
    workdir = Path(tempfile.mkdtemp(prefix="kdserve-bench-", dir=parent))
    same_fs = os.stat(workdir).st_dev == os.stat(tempfile.gettempdir()).st_dev
    print(
        f"kdserve {kdserve.__version__}, numpy {np.__version__}, pyarrow {pa.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}"
    )
    print(
        f"scratch: {workdir} (same filesystem as {tempfile.gettempdir()}: {same_fs}); "
        f"repeats={args.repeats} total={args.total_mb:g}MB/case touch={args.touch} "
        f"cache={'cold' if args.cold else 'warm'} random_reads={args.random_reads}"
    )
    t0 = time.perf_counter()
    results: dict[str, list[Group]] = {}
    try:
        for batch_mb in args.batch_mb:
            case = make_case(batch_mb, args.total_mb, args.seed)
            print(
                f"case {case.label}: {len(case.batches)} batches of {case.rows} rows "
                f"({case.rows * ROW_BYTES / MB:.2f} MB each, {case.nbytes / MB:.0f} MB in all)",
                flush=True,
            )
            results[case.label] = run_case(case, args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print("\n".join(table(results)))
    print()
    for text, ok in goals(results):
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    for text in checked_read_costs(results):
        print(f"COST  {text}")
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
