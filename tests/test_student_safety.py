"""What a student refuses and how it ends: repeated sample ids (offline and online),
data-parallel ranks kept in step, and close() stopping every pass's thread."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

import kdserve as kd
from _helpers import wait_for

TOKEN = "student-safety-token"
JOIN = 20.0


def make_store(path: Path, n: int, batch: int = 100, width: int = 3) -> Path:
    x = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, width), np.float32)
    with kd.Teacher(path, progress=False) as teacher:
        teacher.start_knowledge_service(
            ["x"],
            ["y"],
            lambda f: {"y": f["x"] * 2},
            [(x[i : i + batch],) for i in range(0, n, batch)],
        )
    return path


def student_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kdserve-")]


def test_close_stops_the_threads_of_abandoned_passes(tmp_path):
    store = make_store(tmp_path / "store", 5000)
    before = set(student_threads())
    student = kd.Student(buf_size=2)
    student.register_teacher(in_path=store)
    student.start()
    reader = student.get_knowledge_generator(batch_size=10)
    first, second = reader(), reader()  # two passes, each abandoned after one batch
    next(first)
    next(second)
    time.sleep(0.2)
    assert len(set(student_threads()) - before) >= 2
    student.close()
    wait_for(lambda: not set(student_threads()) - before, JOIN, "the passes' threads to end")


@pytest.mark.parametrize("even", ["pad", "drop"])
def test_uneven_rows_give_every_rank_the_same_batches_offline(tmp_path, even):
    # 1001 rows, 2 ranks, batch 500: without evening, rank 0 reads 1 batch and rank 1 two,
    # and a DDP job deadlocks in its next collective.
    store = make_store(tmp_path / "store", 1001)
    ids = []
    counts = []
    for rank in (0, 1):
        student = kd.Student(rank=rank, world_size=2, even_ranks=even)
        student.register_teacher(in_path=store)
        student.start()
        batches = list(student.get_knowledge_generator(batch_size=500)())
        counts.append(len(batches))
        ids.append(np.concatenate([b["sample_id"] for b in batches]))
        for b in batches:
            np.testing.assert_array_equal(b["y"][:, 0], b["sample_id"] * 2)
    assert counts[0] == counts[1]
    both = np.concatenate(ids)
    if even == "pad":
        assert counts == [2, 2] and set(both.tolist()) == set(range(1001)) and len(both) == 1002
    else:
        assert counts == [1, 1] and len(set(both.tolist())) == len(both) == 1000


def test_uneven_ranks_stay_uneven_only_when_asked(tmp_path):
    store = make_store(tmp_path / "store", 1001)
    counts = []
    for rank in (0, 1):
        student = kd.Student(rank=rank, world_size=2, even_ranks="none")
        student.register_teacher(in_path=store)
        student.start()
        counts.append(len(list(student.get_knowledge_generator(batch_size=500)())))
    assert counts == [2, 2] or sorted(counts) == [1, 2]  # 500 and 501 rows
    with pytest.raises(ValueError, match="even must be one of"):
        kd.Student(even_ranks="sometimes")  # type: ignore[arg-type]


def test_a_store_holding_an_id_twice_is_refused(tmp_path):
    # A store written by another tool (or an older kdserve) that repeats sample id 8.
    store = make_store(tmp_path / "store", 10, batch=10)
    manifest = json.loads((store / "manifest.json").read_text())
    (shard,) = manifest["shards"]
    reader = kd.StoreReader(store)
    data = kd.from_record_batch(reader.read(0, 10), reader.schema)
    ids = data.pop("sample_id").copy()
    ids[9] = 8
    batch = kd.to_record_batch(data, reader.schema, ids)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    raw = sink.getvalue().to_pybytes()
    (store / shard["file"]).write_bytes(raw)
    shard.update(bytes=len(raw), crc32=f"{zlib.crc32(raw):08x}", sample_ids=[0, 8])
    (store / "manifest.json").write_text(json.dumps(manifest))

    student = kd.Student()
    student.register_teacher(in_path=store)
    with pytest.raises(kd.AlignmentError, match=r"sample id\(s\) \[8\] more than once"):
        student.start()


@pytest.fixture
def online_teacher():
    """``start(reader, times=1)`` serves ``y = 2x`` on a free port; closed at teardown."""
    started: list[tuple[kd.Teacher, threading.Thread]] = []

    def start(reader: object, feeds: list[str], times: int = 1) -> kd.Teacher:
        teacher = kd.Teacher(out_port=0, token=TOKEN, progress=False)
        teacher.start()

        def run() -> None:
            # A student that refuses the stream leaves: the test checks the student.
            with contextlib.suppress(kd.KdserveError):
                teacher.start_knowledge_service(
                    feeds, ["y"], lambda f: {"y": f["x"] * 2}, reader, times=times
                )

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        started.append((teacher, thread))
        return teacher

    yield start
    for teacher, thread in started:
        teacher.close()
        thread.join(JOIN)
        assert not thread.is_alive()


def test_an_online_teacher_repeating_ids_is_refused(online_teacher):
    x = np.arange(40, dtype=np.float32)[:, None]
    ids = np.r_[np.arange(20), np.arange(15, 35)]  # 15..19 come twice, in another batch
    teacher = online_teacher([(x[:20], ids[:20]), (x[20:], ids[20:])], ["x", "sample_id"])
    student = kd.Student(token=TOKEN, connect_timeout=20)
    student.register_teacher(in_address=teacher.address)
    student.start()
    with pytest.raises(kd.AlignmentError, match=r"\[15, 16, 17, 18, 19\] twice in pass 0"):
        list(student.get_knowledge_generator(batch_size=10)())
    student.close()


def test_an_online_batch_repeating_an_id_is_refused(online_teacher):
    x = np.arange(10, dtype=np.float32)[:, None]
    ids = np.array([0, 1, 2, 3, 3, 5, 6, 7, 8, 9])
    teacher = online_teacher([(x, ids)], ["x", "sample_id"])
    student = kd.Student(token=TOKEN, connect_timeout=20)
    student.register_teacher(in_address=teacher.address)
    student.start()
    with pytest.raises(kd.AlignmentError, match=r"\[3\] more than once"):
        list(student.get_knowledge_generator(batch_size=10)())
    student.close()


@pytest.mark.parametrize("store", [False, True])
@pytest.mark.parametrize("even", ["pad", "drop"])
def test_uneven_rows_give_every_rank_the_same_batches_online(online_teacher, tmp_path, even, store):
    # 1001 rows in teacher batches of 250 (4 full + 1 row): rank 0 gets 3 batches (501
    # rows), rank 1 two (500 rows); in student batches of 500 that is 2 and 1 batches.
    # With a store merged in, the padding rows (repeated ids) are looked up there too, in
    # one student batch of 1000 with the rows they repeat.
    x = np.arange(1001, dtype=np.float32)[:, None]
    teacher = online_teacher([(x[i : i + 250],) for i in range(0, 1001, 250)], ["x"])
    path = make_store(tmp_path / "store", 1001, width=1) if store else None
    results: dict[int, list[dict[str, np.ndarray]]] = {}
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            student = kd.Student(
                {"y": "mean"}, rank=r, world_size=2, even_ranks=even, token=TOKEN,
                connect_timeout=20,
            )  # fmt: skip
            student.register_teacher(in_address=teacher.address)
            if path is not None:
                student.register_teacher(in_path=path)
            student.start()
            size = 1000 if path is not None else 500
            results[r] = list(student.get_knowledge_generator(batch_size=size)())
            student.close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
    assert not errors and not any(t.is_alive() for t in threads), errors
    assert len(results[0]) == len(results[1])  # no rank waits for another in a collective
    ids = [np.concatenate([b["sample_id"] for b in results[r]]) for r in (0, 1)]
    for r in (0, 1):
        for b in results[r]:
            np.testing.assert_array_equal(b["y"][:, 0], b["sample_id"] * 2)
    both = np.concatenate(ids)
    if even == "pad":
        assert [len(i) for i in ids] == [501, 501] and set(both.tolist()) == set(range(1001))
    else:
        assert [len(i) for i in ids] == [500, 500] and len(set(both.tolist())) == 1000


def test_a_rank_that_gets_no_batch_to_pad_from_is_told_why(online_teacher):
    # 3 samples in teacher batches of 1 dealt to 5 ranks: ranks 3 and 4 get nothing to
    # repeat, and would run fewer steps than the others (a DDP job would deadlock).
    x = np.arange(3, dtype=np.float32)[:, None]
    teacher = online_teacher([(x[i : i + 1],) for i in range(3)], ["x"])
    outcome: dict[int, Any] = {}

    def rank(r: int) -> None:
        try:
            with kd.Student(rank=r, world_size=5, token=TOKEN, connect_timeout=20) as student:
                student.add_teacher(teacher.address)
                outcome[r] = len(list(student.loader(2)))
        except kd.KdserveError as exc:
            outcome[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
    assert [outcome[r] for r in range(3)] == [1, 1, 1]
    for r in (3, 4):
        assert isinstance(outcome[r], kd.KdserveError), outcome
        assert f"rank {r} got no sample" in str(outcome[r]) and "smaller batches" in str(outcome[r])


def test_online_teachers_batching_differently_are_refused_naming_why_with_ranks(online_teacher):
    # Each deals its own batches whole to the ranks: batches of 4 and of 5 give rank 0
    # samples 0-3, 8-11, ... of one and 0-4, 10-14, ... of the other.
    x = np.arange(20, dtype=np.float32)[:, None]
    fours = online_teacher([(x[i : i + 4],) for i in range(0, 20, 4)], ["x"])
    fives = online_teacher([(x[i : i + 5],) for i in range(0, 20, 5)], ["x"])
    outcome: dict[int, Any] = {}

    def rank(r: int) -> None:
        try:
            with kd.Student(
                {"y": "mean"}, rank=r, world_size=2, even_ranks="none", token=TOKEN,
                connect_timeout=20,
            ) as student:  # fmt: skip
                student.add_teacher(fours.address)
                student.add_teacher(fives.address)
                outcome[r] = list(student.loader(8))
        except kd.KdserveError as exc:
            outcome[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
    for r in (0, 1):
        assert isinstance(outcome[r], kd.AlignmentError), outcome
        assert "batches of the same sizes" in str(outcome[r])


def test_a_store_holding_more_samples_is_refused_whichever_is_registered_first(tmp_path):
    small, large = make_store(tmp_path / "small", 10), make_store(tmp_path / "large", 12)
    for order in ((small, large), (large, small)):
        with kd.Student({"y": "mean"}) as student:
            for path in order:
                student.add_store(path)
            only_in_large = r"only in '[^']*': 10\b.*(10 vs 12|12 vs 10)"
            with pytest.raises(kd.AlignmentError, match=only_in_large):
                list(student.loader(4))


def test_a_store_holding_more_samples_than_an_online_teacher_serves_is_refused(
    online_teacher, tmp_path
):
    # Stores are looked up by the ids the online teacher serves: samples only in the
    # store were never read, and nothing said so.
    x = np.arange(10, dtype=np.float32)[:, None]
    teacher = online_teacher([(x[i : i + 4],) for i in range(0, 10, 4)], ["x"])
    store = make_store(tmp_path / "store", 12, width=1)
    with kd.Student({"y": "mean"}, token=TOKEN, connect_timeout=20) as student:
        student.add_teacher(teacher.address)
        student.add_store(store)
        with pytest.raises(kd.AlignmentError, match=r"served 10 in pass 0, store .* holds 12"):
            list(student.loader(3, drop_last=True))  # counted as served, not as read


def test_verify_checks_each_shard_before_its_first_use(tmp_path):
    store = make_store(tmp_path / "store", 300)
    shard = store / kd.StoreReader(store).shards[-1].file
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the crc32 tells
    shard.write_bytes(bytes(data))
    unchecked = kd.Student()
    unchecked.register_teacher(in_path=store)
    unchecked.start()  # sizes match: opens
    checked = kd.Student(verify=True)
    checked.register_teacher(in_path=store)
    with pytest.raises(kd.StoreError, match="crc32"):
        checked.start()
        list(checked.get_knowledge_generator(batch_size=100)())
