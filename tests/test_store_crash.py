"""Crash safety of the knowledge store, with real writer processes killed by SIGKILL.

A teacher process dumps a deterministic dataset into a store of many small shards; the
test kills it at random moments, checks after every kill that what is on disk is a valid
store (every listed shard opens and verifies, every stored sample exactly once, in
order), re-runs the dump to resume it, and kills it again. A final run completes it.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import kdserve as kd
from _helpers import run_script, spawn_script, wait_for_line

N = 4000  # samples in the dataset; sample ids are reader positions 0..N-1
BATCH = 6
SHARD_BYTES = 2048  # a shard every few batches: hundreds of shards
WIDTH = 8

# The writer process. Sample i is x = i * WIDTH + arange(WIDTH) (exact in float32) and
# label = i % 10; the program computes logits = x * 0.5 - 3 and the label is a feed kept
# as is. It prints "started" when it runs the program for the first time (after the
# samples a resumed store already holds have been skipped).
WRITER = """
import json
import sys
import time

import numpy as np

import kdserve

cfg = json.loads(sys.argv[1])
WIDTH = cfg["width"]


def samples():
    for i in range(cfg["n"]):
        x = np.arange(WIDTH, dtype=np.float32) + np.float32(i * WIDTH)
        yield x, np.int64(i % 10)


started = False
calls = 0


def program(feed):
    global started, calls
    if not started:
        print("started", flush=True)
        started = True
    calls += 1
    if cfg.get("fail_after") is not None and calls > cfg["fail_after"]:
        raise RuntimeError("the teacher program failed")
    time.sleep(cfg["sleep"])
    return {"logits": feed["x"] * np.float32(0.5) - np.float32(3)}


teacher = kdserve.Teacher(
    out_path=cfg["out"],
    shard_bytes=cfg["shard_bytes"],
    overwrite=cfg["overwrite"],
    progress=False,
)
teacher.start()
try:
    rows = teacher.start_knowledge_service(
        feed_list=["x", "label"],
        schema=cfg["schema"],
        program=program,
        reader_config={"sample_generator": samples, "batch_size": cfg["batch_size"]},
    )
except kdserve.StoreError as exc:
    print("StoreError:", exc, flush=True)
    sys.exit(3)
except RuntimeError as exc:
    print("RuntimeError:", exc, flush=True)
    sys.exit(4)
if cfg["close"]:
    teacher.close()
print("rows", rows, flush=True)
"""


def expected_logits(ids: np.ndarray) -> np.ndarray:
    x = np.arange(WIDTH, dtype=np.float32)[None, :] + (ids[:, None] * WIDTH).astype(np.float32)
    return x * np.float32(0.5) - np.float32(3)


def _config(store: Path, **overrides: object) -> dict[str, object]:
    cfg: dict[str, object] = {
        "out": str(store),
        "n": N,
        "width": WIDTH,
        "batch_size": BATCH,
        "shard_bytes": SHARD_BYTES,
        "sleep": 0.0,
        "close": True,
        "overwrite": False,
        "schema": ["logits", "label"],
    }
    cfg.update(overrides)
    return cfg


spawn = functools.partial(spawn_script, WRITER)
run = functools.partial(run_script, WRITER)


def rows_reported(output: str) -> int:
    line = next(line for line in output.splitlines() if line.startswith("rows "))
    return int(line.split()[1])


def check_store(store: Path, *, complete: bool | None = None) -> kd.StoreReader:
    """Assert the store is valid: every shard opens and verifies, ids are 0..len-1."""
    reader = kd.StoreReader(store)
    reader.verify()  # sizes, crc32, every batch parses and validates
    n = len(reader)
    assert reader.manifest["rows"] == n
    assert [s.file for s in reader.shards] == [
        f"shard-{i:05d}.arrow" for i in range(len(reader.shards))
    ]
    np.testing.assert_array_equal(reader.sample_ids(), np.arange(n))
    if n:
        batches = [kd.from_record_batch(b, reader.schema) for b in reader.iter_range()]
        logits = np.concatenate([b["logits"] for b in batches])
        labels = np.concatenate([b["label"] for b in batches])
        np.testing.assert_array_equal(logits, expected_logits(np.arange(n)))
        np.testing.assert_array_equal(labels, np.arange(n) % 10)
    for s in reader.shards:
        assert s.min_sample_id is not None and s.max_sample_id is not None
    if complete is not None:
        assert reader.complete is complete
    # Files the manifest does not list can only be the shard that was being written
    # (before or after its rename), the manifest being replaced, and the lock file a
    # killed writer left (its lock died with it).
    listed = {s.file for s in reader.shards} | {kd.store.MANIFEST, kd.store.LOCK}
    next_shard = f"shard-{len(reader.shards):05d}.arrow"
    for p in store.iterdir():
        if p.name not in listed:
            assert p.name in {next_shard, next_shard + ".tmp", kd.store.MANIFEST + ".tmp"}, p
    return reader


def test_writer_killed_at_random_moments_leaves_a_valid_store_and_resumes(tmp_path):
    store = tmp_path / "store"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    cfg = _config(store, sleep=0.01)
    kills, lengths = 0, []
    previous = 0
    for attempt in range(20):
        proc = spawn(tmp_path, cfg)
        if attempt % 4 == 3:
            # Anywhere: during start-up, while the store is opened and resumed, or writing.
            time.sleep(rng.uniform(0.0, 0.6))
        else:
            # Somewhere in the dump proper, after the program ran once.
            if not wait_for_line(proc, "started", timeout=30):
                break
            time.sleep(rng.uniform(0.05, 0.6))
        if proc.poll() is not None:  # finished before the kill
            break
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, f"seed {seed}: writer failed first:\n{err}"
        kills += 1
        if not (store / kd.store.MANIFEST).exists():
            # Killed before the store was created: nothing may have been written yet.
            assert previous == 0, f"seed {seed}: the manifest vanished"
            assert not store.exists() or not any(store.glob("shard-*")), f"seed {seed}"
            continue
        reader = check_store(store, complete=False)
        assert len(reader) >= previous, f"seed {seed}: a resumed dump lost stored rows"
        previous = len(reader)
        lengths.append(previous)

    assert kills >= 15, f"seed {seed}: only {kills} kills landed before the dump finished"
    # The kills must have caught the dump at many different points of its progress.
    assert len(set(lengths)) >= 4, f"seed {seed}: stored rows after kills: {lengths}"
    assert 0 < previous < N, f"seed {seed}: {previous} rows stored after the kills"

    code, output = run(tmp_path, cfg | {"sleep": 0.0})
    assert code == 0, output
    reader = check_store(store, complete=True)
    np.testing.assert_array_equal(reader.sample_ids(), np.arange(N))
    assert len(reader) == N
    assert len(reader.shards) > 100
    assert not list(store.glob("*.tmp"))
    assert sorted(p.name for p in store.iterdir()) == sorted(
        [kd.store.MANIFEST, *(s.file for s in reader.shards)]
    )


def test_exit_without_close_after_the_service_returned_loses_nothing(tmp_path):
    # Pantheon has no close(): when start_knowledge_service returns, the store is complete.
    store = tmp_path / "store"
    n = 600
    code, output = run(tmp_path, _config(store, n=n, close=False))
    assert code == 0, output
    reader = check_store(store, complete=True)
    assert len(reader) == n
    assert not list(store.glob("*.tmp"))

    student = kd.Student()
    student.register_teacher(in_path=store)
    student.start()
    assert len(student) == n
    got = list(student.get_knowledge_generator(batch_size=64)())
    np.testing.assert_array_equal(np.concatenate([b["sample_id"] for b in got]), np.arange(n))
    np.testing.assert_array_equal(
        np.concatenate([b["logits"] for b in got]), expected_logits(np.arange(n))
    )


def test_rerunning_a_complete_dump_writes_nothing(tmp_path):
    store = tmp_path / "store"
    n = 300
    code, output = run(tmp_path, _config(store, n=n))
    assert code == 0, output
    before = check_store(store, complete=True)
    manifest = before.manifest
    contents = {p.name: p.read_bytes() for p in store.glob("shard-*")}
    assert len(contents) > 5

    code, output = run(tmp_path, _config(store, n=n))
    assert code == 0, output
    assert rows_reported(output) == 0
    after = check_store(store, complete=True)
    assert after.manifest["shards"] == manifest["shards"]
    assert {p.name: p.read_bytes() for p in store.glob("shard-*")} == contents


def test_resuming_with_another_schema_is_refused_unless_overwrite(tmp_path):
    store = tmp_path / "store"
    n = 300
    code, output = run(tmp_path, _config(store, n=n, fail_after=n // BATCH // 2))
    assert code == 4, output
    held = len(check_store(store, complete=False))
    assert 0 < held < n

    code, output = run(tmp_path, _config(store, n=n, schema=["logits"]))
    assert code == 3, output
    assert "StoreError" in output and str(store) in output and "overwrite=True" in output
    reader = check_store(store, complete=False)  # untouched
    assert len(reader) == held and reader.schema.names == ["logits", "label"]

    code, output = run(tmp_path, _config(store, n=n, schema=["logits"], overwrite=True))
    assert code == 0, output
    assert rows_reported(output) == n  # started over from sample 0
    reader = kd.StoreReader(store)
    reader.verify()
    assert reader.complete and reader.schema.names == ["logits"]
    np.testing.assert_array_equal(reader.sample_ids(), np.arange(n))
    logits = kd.from_record_batch(reader.read(0, n), reader.schema)["logits"]
    np.testing.assert_array_equal(logits, expected_logits(np.arange(n)))
    assert not list(store.glob("*.tmp"))


def test_a_writer_over_a_complete_store_with_another_schema_is_refused(tmp_path):
    store = tmp_path / "store"
    code, output = run(tmp_path, _config(store, n=120))
    assert code == 0, output
    check_store(store, complete=True)
    other = kd.Schema([kd.Field("logits", "float32", (WIDTH,))])
    with pytest.raises(kd.StoreError, match="overwrite=True") as info:
        kd.StoreWriter(store, other)
    assert str(store) in str(info.value)
    assert len(check_store(store, complete=True)) == 120

    with kd.StoreWriter(store, other, overwrite=True) as writer:
        assert writer.rows == 0
    reader = kd.StoreReader(store)
    assert len(reader) == 0 and reader.complete and reader.shards == []
    assert not list(store.glob("shard-*"))


def test_rerunning_over_a_complete_store_with_another_schema_is_refused(tmp_path):
    # Every sample is already stored, so the run skips them all: it must still check its
    # schema against the store's instead of silently doing nothing.
    store = tmp_path / "store"
    code, output = run(tmp_path, _config(store, n=120))
    assert code == 0, output
    code, output = run(tmp_path, _config(store, n=120, schema=["logits"]))
    assert code == 3, output
    assert "StoreError" in output and str(store) in output and "overwrite=True" in output
    reader = check_store(store, complete=True)  # untouched
    assert len(reader) == 120 and reader.schema.names == ["logits", "label"]


def test_resuming_a_store_that_holds_every_sample_marks_it_complete(tmp_path):
    # The writer exited after its last shard was durable but before close() marked the
    # store complete: re-running the dump skips every sample and must still complete it.
    store = tmp_path / "store"
    n = 60
    code, output = run(tmp_path, _config(store, n=n, shard_bytes=1))
    assert code == 0, output
    # A writer killed between its last shard and marking the store complete leaves this:
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["complete"] = False
    (store / "manifest.json").write_text(json.dumps(manifest))
    assert len(check_store(store, complete=False)) == n
    code, output = run(tmp_path, _config(store, n=n, shard_bytes=1))
    assert code == 0, output
    check_store(store, complete=True)


def test_a_resumed_dump_reports_the_rows_it_wrote(tmp_path):
    # start_knowledge_service() returns the rows this call wrote, not those it found.
    store = tmp_path / "store"
    n = 300
    code, output = run(tmp_path, _config(store, n=n, fail_after=n // BATCH // 2))
    assert code == 4, output
    held = len(check_store(store, complete=False))
    assert 0 < held < n
    code, output = run(tmp_path, _config(store, n=n))
    assert code == 0, output
    assert rows_reported(output) == n - held
