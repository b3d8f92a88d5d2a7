"""Store safety (issue #8): one writer at a time, each sample id once, damaged shards repaired.

Writers run as real processes (killed with SIGKILL where the test says so) over real
store files damaged on disk; the CLI runs as a real ``kdserve`` process. Every repair an
error message promises is carried out here, and must end with every sample exactly once.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kdserve as kd
from _helpers import run_script, spawned_until
from kdserve.core.idset import IdSet
from kdserve.store import DAMAGED, LOCK, MANIFEST, damage, repair, stored_rows

KDSERVE = str(Path(sys.executable).with_name("kdserve"))
WIDTH = 8
BATCH = 6
SHARD_BYTES = 2048  # a shard every few batches
SCHEMA = kd.Schema([kd.Field("logits", "float32", (WIDTH,)), kd.Field("label", "int64")])

# A dump that writes samples 0..n-1 in batches, skipping those the store holds (how a
# resumed dump regenerates exactly the missing samples). Sample i has logits
# i * WIDTH + arange(WIDTH) (exact in float32) and label i % 10. With "pause_after": k it
# flushes after batch k, prints "holding" and waits for a line on stdin, holding the lock.
WRITER = """
import json
import logging
import sys
import time

import numpy as np

import kdserve

logging.basicConfig()  # kdserve's warnings to stderr
cfg = json.loads(sys.argv[1])
W = cfg["width"]
schema = kdserve.Schema(
    [kdserve.Field("logits", "float32", (W,)), kdserve.Field("label", "int64")]
)
try:
    writer = kdserve.StoreWriter(
        cfg["out"], schema, shard_bytes=cfg["shard_bytes"], teacher={"name": "safety"}
    )
except kdserve.StoreLockedError as exc:
    print("StoreLockedError:", exc, flush=True)
    sys.exit(4)
except kdserve.StoreError as exc:
    print("StoreError:", exc, flush=True)
    sys.exit(3)
print("opened", writer.rows, flush=True)
written = 0
every = np.arange(cfg["n"], dtype=np.int64)
for k, start in enumerate(range(0, cfg["n"], cfg["batch"])):
    ids = every[start : start + cfg["batch"]]
    ids = ids[~writer.holds(ids)]
    if len(ids):
        logits = ids[:, None].astype(np.float32) * np.float32(W) + np.arange(W, dtype=np.float32)
        writer.write(kdserve.to_record_batch({"logits": logits, "label": ids % 10}, schema, ids))
        written += len(ids)
    if cfg.get("pause_after") == k:
        writer.flush()
        print("holding", flush=True)
        sys.stdin.readline()
    time.sleep(cfg.get("sleep", 0.0))
writer.close()
print("wrote", written, flush=True)
"""


def _config(store: Path, n: int, **overrides: object) -> dict[str, object]:
    cfg: dict[str, object] = {
        "out": str(store),
        "n": n,
        "width": WIDTH,
        "batch": BATCH,
        "shard_bytes": SHARD_BYTES,
    }
    cfg.update(overrides)
    return cfg


run = functools.partial(run_script, WRITER)
holding = functools.partial(spawned_until, WRITER, word="holding")


def wrote(output: str) -> int:
    line = next(line for line in output.splitlines() if line.startswith("wrote "))
    return int(line.split()[1])


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KDSERVE, *args], capture_output=True, text=True, timeout=60, check=False)


def check_every_sample_once(store: Path, n: int) -> kd.StoreReader:
    """The store verifies and holds samples 0..n-1 exactly once each, with their values."""
    reader = kd.StoreReader(store)
    reader.verify()
    ids = reader.sample_ids()
    assert len(ids) == n
    np.testing.assert_array_equal(np.sort(ids), np.arange(n))
    data = kd.from_record_batch(reader.read(0, len(reader)), reader.schema)
    expected = ids[:, None].astype(np.float32) * np.float32(WIDTH) + np.arange(WIDTH)
    np.testing.assert_array_equal(data["logits"], expected)
    np.testing.assert_array_equal(data["label"], ids % 10)
    return reader


def shard_files(store: Path) -> list[str]:
    return [s["file"] for s in json.loads((store / MANIFEST).read_text())["shards"]]


def flip(file: Path, position: int, mask: int = 0x01) -> None:
    data = bytearray(file.read_bytes())
    data[position] ^= mask
    file.write_bytes(bytes(data))


def batch_of(ids: list[int] | np.ndarray) -> object:
    ids = np.asarray(ids, dtype=np.int64)
    logits = ids[:, None].astype(np.float32) * np.float32(WIDTH) + np.arange(WIDTH)
    return kd.to_record_batch({"logits": logits, "label": ids % 10}, SCHEMA, ids)


# -- one writer at a time -----------------------------------------------------------------


def test_a_second_writer_process_is_refused_while_the_first_writes(tmp_path):
    store = tmp_path / "store"
    n = 600
    with holding(tmp_path, _config(store, n, pause_after=20)) as first:
        holder = json.loads((store / LOCK).read_text())
        assert holder == {"pid": first.pid, "host": socket.gethostname()}

        code, output = run(tmp_path, _config(store, n))
        assert code == 4, output
        assert "StoreLockedError" in output and str(store) in output
        assert f"pid {first.pid} on host {socket.gethostname()}" in output
        assert "wait for that writer" in output and "released its lock" in output
        with pytest.raises(kd.StoreLockedError) as info:  # and in this process too
            kd.StoreWriter(store, SCHEMA)
        assert info.value.pid == first.pid and info.value.host == socket.gethostname()
        assert info.value.path == str(store)

        # The refused writers changed nothing; readers do not take the lock.
        reader = kd.StoreReader(store)
        reader.verify()
        held = len(reader)
        assert held >= 21 * BATCH
        np.testing.assert_array_equal(reader.sample_ids(), np.arange(held))
        assert cli("verify", str(store)).returncode == 0

        assert first.stdin is not None
        first.stdin.write("go\n")
        first.stdin.flush()
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0, out + err
        assert wrote(out) == n
    reader = check_every_sample_once(store, n)
    assert reader.complete
    assert not (store / LOCK).exists()  # the writer removed it as it closed

    code, output = run(tmp_path, _config(store, n))  # the lock is free again
    assert code == 0, output
    assert wrote(output) == 0


def test_a_sigkilled_writer_never_blocks_the_resume(tmp_path):
    store = tmp_path / "store"
    n = 600
    with holding(tmp_path, _config(store, n, pause_after=30)) as victim:
        with pytest.raises(kd.StoreLockedError) as info:  # it does hold the lock
            kd.StoreWriter(store, SCHEMA)
        assert info.value.pid == victim.pid
        os.kill(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=30)
        assert victim.returncode == -signal.SIGKILL
    # The file stays behind with the dead writer's pid; its lock died with the process.
    assert json.loads((store / LOCK).read_text())["pid"] == victim.pid
    held = len(kd.StoreReader(store))
    assert 31 * BATCH <= held < n

    code, output = run(tmp_path, _config(store, n))
    assert code == 0, output
    assert wrote(output) == n - held
    reader = check_every_sample_once(store, n)
    assert reader.complete and not (store / LOCK).exists()


def test_a_second_writer_in_the_same_process_is_refused_until_the_first_closes(tmp_path):
    store = tmp_path / "store"
    first = kd.StoreWriter(store, SCHEMA)
    first.write(batch_of(range(10)))
    for attempt in (
        lambda: kd.StoreWriter(store, SCHEMA),
        lambda: kd.StoreWriter(store, SCHEMA, overwrite=True),
        lambda: repair(store),
    ):
        with pytest.raises(kd.StoreLockedError) as info:
            attempt()
        assert info.value.pid == os.getpid()
        assert f"pid {os.getpid()}" in str(info.value) and str(store) in str(info.value)
    first.close()
    assert not (store / LOCK).exists()
    with kd.StoreWriter(store, SCHEMA) as second:  # nothing was started over
        assert second.rows == 10
        second.write(batch_of(range(10, 20)))
    np.testing.assert_array_equal(kd.StoreReader(store).sample_ids(), np.arange(20))


def test_a_writer_that_fails_to_open_or_is_dropped_unclosed_releases_the_lock(tmp_path):
    store = tmp_path / "store"
    with kd.StoreWriter(store, SCHEMA) as writer:
        writer.write(batch_of(range(6)))
    other = kd.Schema([kd.Field("logits", "float32", (WIDTH,))])
    with pytest.raises(kd.StoreError, match="overwrite=True"):
        kd.StoreWriter(store, other)
    dropped = kd.StoreWriter(store, SCHEMA)
    dropped.write(batch_of(range(6, 12)))
    assert (store / LOCK).exists()
    del dropped
    gc.collect()
    assert not (store / LOCK).exists()
    with kd.StoreWriter(store, SCHEMA) as writer:
        assert writer.rows == 6  # the dropped writer's unfinished shard is not kept
        assert not writer.holds(np.arange(6, 12)).any()


# -- IdSet --------------------------------------------------------------------------------

# Ids bunched near a few centres (so runs touch, overlap and merge) and near int64's ends.
_CENTRES = [0, 1000, -(2**63), 2**63 - 40]
_ids = st.builds(
    lambda centre, offsets: [centre + o for o in offsets],
    st.sampled_from(_CENTRES),
    st.lists(st.integers(0, 30), max_size=25),
)
_ranges = st.tuples(st.sampled_from(_CENTRES), st.integers(0, 30), st.integers(0, 8))


def _check_idset(s: IdSet, expected: set[int], queries: list[int]) -> None:
    assert len(s) == len(expected)
    np.testing.assert_array_equal(s.to_array(), np.array(sorted(expected), dtype=np.int64))
    mask = s.contains(np.array(queries, dtype=np.int64))
    assert mask.dtype == bool
    assert mask.tolist() == [q in expected for q in queries]
    starts, stops = s.runs
    assert (starts < stops).all()
    assert (starts[1:] > stops[:-1]).all()  # sorted, disjoint and not touching


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(_ids, _ranges), max_size=12),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=10),
)
def test_idset_behaves_like_a_python_set(steps, extra_queries):
    s, expected = IdSet(), set()
    for step in steps:
        if isinstance(step, tuple):
            centre, offset, length = step
            start = centre + offset
            s.add_range(start, start + length)
            expected.update(range(start, start + length))
        else:
            s.add(np.array(step, dtype=np.int64))
            expected.update(step)
        near = [i + d for i in sorted(expected)[:20] for d in (-1, 0, 1)]
        queries = [q for q in near + extra_queries if -(2**63) <= q < 2**63]
        _check_idset(s, expected, queries)
    assert IdSet(np.array(sorted(expected), dtype=np.int64)) == s  # same runs however built


def test_idset_of_contiguous_ids_is_one_run_in_any_order():
    forward, backward = IdSet(), IdSet()
    chunks = np.array_split(np.arange(10**6, dtype=np.int64), 1000)
    for chunk in chunks:
        forward.add(chunk)
    for chunk in reversed(chunks):
        backward.add(chunk[::-1])
    for s in (forward, backward):
        assert len(s) == 10**6 and len(s.runs[0]) == 1
        assert s.contains(np.array([-1, 0, 999_999, 10**6])).tolist() == [0, 1, 1, 0]
    assert IdSet.from_range(0, 10**6) == forward
    assert IdSet().contains(np.arange(3)).tolist() == [False] * 3
    assert len(IdSet()) == 0


# -- unique sample ids --------------------------------------------------------------------


def _untouched(store: Path) -> dict[str, bytes]:
    """The store's shard files' contents."""
    return {p.name: p.read_bytes() for p in store.glob("shard-*")}


def test_a_batch_repeating_its_own_ids_is_refused_and_nothing_is_written(tmp_path):
    store = tmp_path / "store"
    with kd.StoreWriter(store, SCHEMA, teacher={"name": "bert"}) as writer:
        with pytest.raises(kd.AlignmentError) as info:
            writer.write(batch_of([0, 1, 2, 1, 3, 2]))
        err = info.value
        assert err.teacher == "bert" and err.teachers == ("bert", "bert")
        assert err.sample_ids == (1, 2)
        assert "'bert'" in str(err) and "2 repeated within the batch (first: [1, 2])" in str(err)
        assert "holds()" in str(err)
        assert writer.rows == 0 and not writer.holds(np.arange(4)).any()
    reader = kd.StoreReader(store)
    assert len(reader) == 0 and reader.shards == []
    assert not list(store.glob("shard-*"))


def test_a_batch_repeating_ids_of_earlier_batches_is_refused(tmp_path):
    store = tmp_path / "store"
    with kd.StoreWriter(store, SCHEMA, shard_bytes=1 << 20) as writer:
        writer.write(batch_of(range(10)))
        assert writer.holds(np.array([9, 10, -1, 0])).tolist() == [True, False, False, True]
        for ids, message in (
            ([12, 8, 11, 9], "2 already in the store (first: [8, 9])"),
            ([20, 3, 20], "1 already in the store (first: [3]); 1 repeated within the batch"),
            (
                [*range(100, 110), *range(10)],
                "10 already in the store (first: [0, 1, 2, 3, 4, ...])",
            ),
        ):
            with pytest.raises(kd.AlignmentError, match=r"'store'") as info:  # the store's name
                writer.write(batch_of(ids))
            assert message in str(info.value)
            assert writer.rows == 10
        writer.write(batch_of([10, 12, 11]))
    np.testing.assert_array_equal(kd.StoreReader(store).sample_ids(), [*range(10), 10, 12, 11])


@pytest.mark.parametrize("stride", [1, 3], ids=["contiguous-ids", "scattered-ids"])
def test_a_resumed_store_refuses_the_ids_it_holds(tmp_path, stride):
    # Contiguous shards' ids come from the manifest; scattered ones' from the shards.
    store = tmp_path / "store"
    ids = 1000 + stride * np.arange(120)
    with kd.StoreWriter(store, SCHEMA, shard_bytes=SHARD_BYTES) as writer:
        for chunk in np.array_split(ids, 20):
            writer.write(batch_of(chunk))
    assert len(shard_files(store)) > 3
    before, manifest = _untouched(store), json.loads((store / MANIFEST).read_text())

    writer = kd.StoreWriter(store, SCHEMA, teacher={"name": "resumed"})
    probe = np.arange(900, 1500)
    np.testing.assert_array_equal(writer.holds(probe), np.isin(probe, ids))
    last = int(ids[-1])
    with pytest.raises(kd.AlignmentError, match="'resumed'") as info:
        writer.write(batch_of([last + 1, int(ids[50]), last + 2]))
    assert info.value.sample_ids == (int(ids[50]),)
    assert writer.rows == 120
    writer.close(complete=manifest["complete"])
    assert _untouched(store) == before
    after = json.loads((store / MANIFEST).read_text())
    assert after["shards"] == manifest["shards"] and after["rows"] == 120


# -- damaged shards -----------------------------------------------------------------------


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:-100])


def _flip_middle(f: Path) -> None:
    flip(f, f.stat().st_size // 2)


def _delete(f: Path) -> None:
    f.unlink()


@pytest.mark.parametrize(
    "damage", [_truncate, _flip_middle, _delete], ids=["truncated", "byte-flipped", "deleted"]
)
def test_a_damaged_last_shard_is_set_aside_on_resume_and_regenerated(tmp_path, damage):
    store = tmp_path / "store"
    n = 300
    code, output = run(tmp_path, _config(store, n))
    assert code == 0, output
    manifest = json.loads((store / MANIFEST).read_text())
    last = manifest["shards"][-1]
    f = store / last["file"]
    damage(f)
    damaged = f.read_bytes() if f.exists() else None
    assert stored_rows(store) == n - last["rows"]  # what a resuming dump will find

    code, output = run(tmp_path, _config(store, n))
    assert code == 0, output
    assert f"its last shard {last['file']} is" in output  # the warning, on stderr
    assert f"without its {last['rows']} samples" in output
    assert wrote(output) == last["rows"]
    reader = check_every_sample_once(store, n)
    assert reader.complete
    aside = store / (last["file"] + DAMAGED)
    if damaged is None:
        assert not aside.exists()
    else:
        assert aside.read_bytes() == damaged  # set aside, never deleted
        assert last["file"] not in shard_files(store)  # a new name for the regenerated shard
    assert not (store / LOCK).exists()


def _written(store: Path, n: int) -> str:
    """Write samples 0..n-1 to a new store in a process of its own; its last shard's file."""
    code, output = run(store.parent, _config(store, n))
    assert code == 0, output
    return shard_files(store)[-1]


def test_a_resume_after_stored_rows_hashes_the_last_shard_once(tmp_path, monkeypatch):
    store = tmp_path / "store"
    last = _written(store, 120)
    hashed: list[str] = []
    crc32_file = damage.crc32_file
    monkeypatch.setattr(damage, "crc32_file", lambda f: hashed.append(f.name) or crc32_file(f))
    assert stored_rows(store) == 120  # a dump asks, then its writer resumes
    with kd.StoreWriter(store, SCHEMA) as writer:
        assert writer.rows == 120
    assert stored_rows(store) == 120
    assert hashed == [last]


def test_a_last_shard_changed_after_stored_rows_is_still_set_aside_on_resume(tmp_path, caplog):
    store = tmp_path / "store"
    last = _written(store, 120)
    assert stored_rows(store) == 120
    f = store / last
    copy = tmp_path / "copy"
    copy.write_bytes(f.read_bytes())
    flip(copy, copy.stat().st_size // 2)
    os.replace(copy, f)  # how a tool replaces a file: same size, another file
    with (
        caplog.at_level(logging.WARNING, logger="kdserve"),
        kd.StoreWriter(store, SCHEMA) as writer,
    ):
        assert not writer.holds(np.arange(120)).all()
        for ids in np.array_split(np.flatnonzero(~writer.holds(np.arange(120))), 3):
            writer.write(batch_of(ids))
    check_every_sample_once(store, 120)
    assert (store / (last + DAMAGED)).exists()
    [warning] = [r for r in caplog.records if r.name.startswith("kdserve.store")]
    assert f"its last shard {last} is corrupted (crc32" in warning.getMessage()


def test_a_damaged_middle_shard_is_repaired_with_the_cli_then_regenerated(tmp_path):
    store = tmp_path / "store"
    n = 600
    code, output = run(tmp_path, _config(store, n))
    assert code == 0, output
    files = shard_files(store)
    assert len(files) > 10
    manifest = json.loads((store / MANIFEST).read_text())
    middle = manifest["shards"][len(files) // 2]
    f = store / middle["file"]
    _truncate(f)
    damaged = f.read_bytes()

    # The resume refuses, saying exactly what to do.
    code, output = run(tmp_path, _config(store, n))
    assert code == 3, output
    assert "StoreError" in output and middle["file"] in output
    assert f"run `kdserve verify --repair {store}`" in output
    assert "then re-run the dump" in output
    assert json.loads((store / MANIFEST).read_text()) == manifest  # untouched
    # So does a reader.
    with pytest.raises(kd.StoreError, match="kdserve verify --repair"):
        kd.StoreReader(store)

    out = cli("verify", "--repair", str(store))
    assert out.returncode == 0, out.stderr
    assert f"set aside {middle['file']}" in out.stdout
    assert f"{middle['rows']} samples lost" in out.stdout
    assert f"Re-run the dump to regenerate those {middle['rows']} samples" in out.stdout
    assert "OK:" in out.stdout and "(incomplete)" in out.stdout
    assert (store / (middle["file"] + DAMAGED)).read_bytes() == damaged
    reader = kd.StoreReader(store)  # the repaired store reads
    reader.verify()
    assert len(reader) == n - middle["rows"] and not reader.complete
    assert not np.isin(
        np.arange(middle["sample_ids"][0], middle["sample_ids"][1] + 1), reader.sample_ids()
    ).any()
    out = cli("verify", "--repair", str(store))
    assert out.returncode == 0 and "nothing to repair" in out.stdout

    code, output = run(tmp_path, _config(store, n))
    assert code == 0, output
    assert wrote(output) == middle["rows"]
    reader = check_every_sample_once(store, n)
    assert reader.complete
    names = shard_files(store)
    assert middle["file"] not in names and len(set(names)) == len(names)
    assert set(files) - {middle["file"]} < set(names)  # the other shards are kept as they were
    assert (store / (middle["file"] + DAMAGED)).read_bytes() == damaged
    # Tools reading the *.arrow files see every sample once; the .damaged file is not one.
    table = ds.dataset(sorted(map(str, store.glob("*.arrow"))), format="ipc").to_table()
    np.testing.assert_array_equal(np.sort(table.column("sample_id").to_numpy()), np.arange(n))


def test_repair_sets_aside_every_kind_of_damage_and_names_never_collide(tmp_path):
    store = tmp_path / "store"
    n = 600
    code, output = run(tmp_path, _config(store, n))
    assert code == 0, output
    shards = json.loads((store / MANIFEST).read_text())["shards"]
    assert len(shards) > 12
    flipped, truncated, deleted, last = shards[2], shards[5], shards[9], shards[-1]
    flip(store / flipped["file"], (store / flipped["file"]).stat().st_size // 2)
    _truncate(store / truncated["file"])
    (store / deleted["file"]).unlink()
    flip(store / last["file"], 100)
    # A byte flip in a middle shard is only found by a crc32 check: verify says what to do.
    out = cli("verify", str(store))
    assert out.returncode == 1 and "kdserve verify --repair" in out.stderr

    lost = repair(store)
    assert lost == [(s["file"], s["rows"]) for s in (flipped, truncated, deleted, last)]
    assert repair(store) == []
    manifest = json.loads((store / MANIFEST).read_text())
    assert manifest["complete"] is False
    assert manifest["rows"] == n - sum(rows for _, rows in lost)
    for s in (flipped, truncated, last):
        assert (store / (s["file"] + DAMAGED)).exists()
    assert not (store / (deleted["file"] + DAMAGED)).exists()

    code, output = run(tmp_path, _config(store, n))
    assert code == 0, output
    assert wrote(output) == sum(rows for _, rows in lost)
    check_every_sample_once(store, n)
    names = shard_files(store)
    for s in (flipped, truncated, deleted, last):
        assert s["file"] not in names

    # Starting over keeps the set-aside files and names its shards after them.
    with kd.StoreWriter(store, SCHEMA, overwrite=True) as writer:
        writer.write(batch_of(range(6)))
    assert len(list(store.glob(f"*{DAMAGED}"))) == 3
    (first,) = shard_files(store)
    assert int(first[len("shard-") : -len(".arrow")]) > int(last["file"][6:11])


def test_repair_of_a_healthy_store_changes_nothing(tmp_path):
    store = tmp_path / "store"
    code, output = run(tmp_path, _config(store, 120))
    assert code == 0, output
    manifest = (store / MANIFEST).read_bytes()
    assert repair(store) == []
    assert (store / MANIFEST).read_bytes() == manifest
    out = cli("verify", "--repair", str(store))
    assert out.returncode == 0 and "nothing to repair" in out.stdout and "(complete)" in out.stdout
    out = cli("verify", "--repair", str(tmp_path / "nowhere"))
    assert out.returncode == 1 and "does not exist" in out.stderr


def _store_of(tmp_path: Path, n: int = 60) -> Path:
    store = tmp_path / "store"
    with kd.StoreWriter(store, SCHEMA, shard_bytes=SHARD_BYTES) as writer:
        for start in range(0, n, BATCH):
            writer.write(batch_of(range(start, start + BATCH)))
    return store


def _edit_manifest(store: Path, edit: object) -> None:
    manifest = json.loads((store / MANIFEST).read_text())
    edit(manifest)  # type: ignore[operator]
    (store / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("file", ["../victim.arrow", "/tmp/victim.arrow", "sub/shard-00001.arrow"])
def test_a_manifest_naming_a_file_outside_the_store_is_refused_and_nothing_moves(tmp_path, file):
    store = _store_of(tmp_path)
    victim = tmp_path / "victim.arrow"
    victim.write_bytes(b"not yours")

    def point_outside(m: dict) -> None:
        m["shards"][0]["file"] = file

    _edit_manifest(store, point_outside)
    before = _untouched(store)
    for args in (("verify", str(store)), ("verify", "--repair", str(store))):
        out = cli(*args)
        assert out.returncode == 1, out
        assert repr(file) in out.stderr and "not a shard name" in out.stderr, out.stderr
    with pytest.raises(kd.StoreError, match="not a shard name"):
        kd.StoreReader(store)
    assert victim.read_bytes() == b"not yours"
    assert _untouched(store) == before


def test_a_manifest_listing_a_shard_twice_fails_verify(tmp_path):
    store = _store_of(tmp_path)
    _edit_manifest(store, lambda m: m["shards"].append(m["shards"][0]))
    out = cli("verify", str(store))
    assert out.returncode == 1 and "lists shard shard-00000.arrow twice" in out.stderr, out


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"format": "kdserve.store", "version": 1, "shards": null, "schema": {}}', "not a list"),
        ("[" * 100_000 + "]" * 100_000, "unreadable or corrupted"),
    ],
)
def test_a_garbled_manifest_gets_a_message_that_names_the_problem(tmp_path, text, says):
    store = _store_of(tmp_path)
    (store / MANIFEST).write_text(text)
    with pytest.raises(kd.StoreError, match=says):
        kd.StoreReader(store)
    out = cli("verify", str(store))
    assert out.returncode == 1 and says in out.stderr and "Traceback" not in out.stderr


def test_repair_blames_a_damaged_manifest_schema_and_sets_no_intact_shard_aside(tmp_path):
    store = _store_of(tmp_path)

    def narrow(m: dict) -> None:
        field = next(f for f in m["schema"]["fields"] if f["name"] == "logits")
        field["dtype"] = "float16"

    _edit_manifest(store, narrow)
    before = _untouched(store)
    out = cli("verify", "--repair", str(store))
    assert out.returncode == 1, out
    assert "is damaged" in out.stderr and "intact" in out.stderr, out.stderr
    assert "'logits'" in out.stderr and "float" in out.stderr and "halffloat" in out.stderr
    assert _untouched(store) == before
    assert not list(store.glob(f"*{DAMAGED}*"))


# -- checked reads ------------------------------------------------------------------------


def test_verified_reader_checks_each_shard_before_its_first_use(tmp_path):
    store = tmp_path / "store"
    code, output = run(tmp_path, _config(store, 300))
    assert code == 0, output
    shards = json.loads((store / MANIFEST).read_text())["shards"]
    target = shards[3]
    start = sum(s["rows"] for s in shards[:3])
    # Flip the lowest bit of one logit: Arrow cannot tell, only the crc32 can.
    row = target["sample_ids"][0] + 1
    value = (np.float32(row * WIDTH) + np.arange(WIDTH, dtype=np.float32))[2].tobytes()
    f = store / target["file"]
    data = f.read_bytes()
    assert data.count(value) == 1
    flip(f, data.index(value))

    plain = kd.StoreReader(store)
    got = kd.from_record_batch(plain.read(start, start + target["rows"]), plain.schema)
    assert got["logits"][1, 2] != row * WIDTH + 2  # read back wrong, silently

    checked = kd.StoreReader(store, verify=True)  # lazily: opening reads no shard
    n = len(checked)
    assert checked.read(0, start).num_rows == start  # the shards before it check out
    assert checked.read(n - 5, n).num_rows == 5
    for _ in range(2):
        with pytest.raises(kd.StoreError, match="crc32") as info:
            checked.read(start, start + 1)
        assert str(f) in str(info.value) and "kdserve verify --repair" in str(info.value)
    with pytest.raises(kd.StoreError, match="crc32"):
        kd.StoreReader(store, verify=True).take(np.array([start + 1]))

    assert [file for file, _ in repair(store)] == [target["file"]]
    checked = kd.StoreReader(store, verify=True)
    assert checked.read(0, len(checked)).num_rows == 300 - target["rows"]
    checked.verify()


def test_idset_add_new_adds_only_ids_that_are_new_and_given_once():
    ids = IdSet()
    assert ids.add_new(np.arange(10))  # the fast path: counting on
    assert ids.add_new(np.array([20, 22, 21]))  # out of order, after the set
    assert ids.add_new(np.array([15, 12]))  # inside a gap
    assert not ids.add_new(np.array([30, 9]))  # 9 is held: nothing added
    assert not ids.add_new(np.array([40, 40]))  # repeated within: nothing added
    assert not ids.add_new(np.array([50, 51, 51]))  # increasing but repeated: refused
    assert sorted(ids.to_array().tolist()) == [*range(10), 12, 15, 20, 21, 22]


def test_a_store_writer_whose_with_block_raises_leaves_the_store_incomplete(tmp_path):
    def batch(i: int):
        ids = np.arange(BATCH * i, BATCH * (i + 1))
        logits = np.ones((BATCH, WIDTH), np.float32) * ids[:, None]
        return kd.to_record_batch({"logits": logits, "label": ids % 10}, SCHEMA, sample_ids=ids)

    with (
        pytest.raises(RuntimeError, match="the producer died"),
        kd.StoreWriter(tmp_path / "s", SCHEMA, shard_bytes=SHARD_BYTES) as writer,
    ):
        for i in range(5):
            if i == 2:
                raise RuntimeError("the producer died")
            writer.write(batch(i))
    reader = kd.StoreReader(tmp_path / "s")
    assert not reader.complete and len(reader) == 2 * BATCH  # durable, but not complete
    with kd.StoreWriter(tmp_path / "s", SCHEMA, shard_bytes=SHARD_BYTES) as writer:
        for i in range(2, 5):  # the rest, resumed
            writer.write(batch(i))
    reader = kd.StoreReader(tmp_path / "s")
    assert reader.complete and len(reader) == 5 * BATCH
