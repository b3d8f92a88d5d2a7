"""A teacher's lifecycle: Pantheon-style use without close(), continuation, failures, and
close() from another thread. Each test checks what a student can then read."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kdserve as kd

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def program(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"logits": feed["x"] @ W}


def failing_on(when: Callable[[int], bool], why: str) -> Callable[[dict[str, np.ndarray]], Any]:
    """``program``, raising RuntimeError(why) on the calls (numbered from 1) ``when`` picks."""
    calls = 0

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        nonlocal calls
        calls += 1
        if when(calls):
            raise RuntimeError(why)
        return program(feed)

    return run


def inputs(n: int, start: int = 0) -> np.ndarray:
    return (np.arange(start * 4, (start + n) * 4, dtype=np.float32).reshape(n, 4)) / 7


def batches(n: int, size: int, start: int = 0) -> list[tuple[np.ndarray]]:
    x = inputs(n, start)
    return [(x[i : i + size],) for i in range(0, n, size)]


def read_all(path: Path, allow_incomplete: bool = False) -> dict[str, np.ndarray]:
    student = kd.Student()
    student.register_teacher(in_path=path, allow_incomplete=allow_incomplete)
    student.start()
    got = list(student.get_knowledge_generator(batch_size=1000)())
    return {k: np.concatenate([b[k] for b in got]) for k in got[0]}


def run_script(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )


def test_services_and_dumps_on_one_teacher_continue_the_store_without_close(tmp_path):
    # Pantheon style, in its own process: no close(), no `with`. Each returned call is
    # durable and the store complete after it; the next call appends with ids counting on.
    store = tmp_path / "store"
    done = run_script(
        tmp_path,
        f"""
        import json, numpy as np, kdserve as kd
        W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
        x = np.arange(0, 70 * 4, dtype=np.float32).reshape(70, 4) / 7
        program = lambda feed: {{"logits": feed["x"] @ W}}
        teacher = kd.Teacher(out_path={str(store)!r}, progress=False)
        teacher.start()
        teacher.start_knowledge_service(["x"], ["logits"], program, [(x[:30],)])
        print(json.dumps([kd.StoreReader({str(store)!r}).complete,
                          len(kd.StoreReader({str(store)!r}))]), flush=True)
        teacher.start_knowledge_service(["x"], ["logits"], program,
                                        [(x[30:40],), (x[40:50],)])
        print(json.dumps([kd.StoreReader({str(store)!r}).complete,
                          len(kd.StoreReader({str(store)!r}))]), flush=True)
        teacher.dump({{"logits": x[50:60] @ W}})
        teacher.dump({{"logits": x[60:70] @ W}})
        """,  # the process exits here, without close()
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[true,", "30]", "[true,", "50]"]
    reader = kd.StoreReader(store)
    reader.verify()
    assert reader.complete and len(reader) == 70
    got = read_all(store)
    np.testing.assert_array_equal(got["sample_id"], np.arange(70))
    np.testing.assert_allclose(got["logits"], inputs(70) @ W, rtol=1e-6)


def test_a_program_that_raises_inside_with_leaves_the_store_incomplete(tmp_path):
    store = tmp_path / "store"
    with (
        pytest.raises(RuntimeError, match="GPU fell over"),
        kd.Teacher(store, shard_bytes=1, progress=False) as teacher,
    ):
        failing = failing_on(lambda call: call > 4, "the GPU fell over")
        teacher.start_knowledge_service(["x"], ["logits"], failing, batches(100, 10))
    reader = kd.StoreReader(store)
    reader.verify()  # valid: every durable shard is whole
    assert not reader.complete and 0 < len(reader) < 100
    with pytest.raises(kd.StoreError, match="incomplete"):
        read_all(store)
    held = read_all(store, allow_incomplete=True)
    np.testing.assert_array_equal(held["sample_id"], np.arange(len(reader)))

    # A re-run resumes and completes it: every sample exactly once.
    with kd.Teacher(store, progress=False) as teacher:
        teacher.start_knowledge_service(["x"], ["logits"], program, batches(100, 10))
    got = read_all(store)
    np.testing.assert_array_equal(got["sample_id"], np.arange(100))
    np.testing.assert_allclose(got["logits"], inputs(100) @ W, rtol=1e-6)


def test_a_service_retried_on_the_same_teacher_resumes_the_failed_one(tmp_path):
    # The failed service had read ahead of what it stored: the retry used to count ids on
    # from there, storing samples 0.. again under new ids and leaving a gap, and a later
    # service went on from the wrong id.
    store = tmp_path / "store"
    flaky = failing_on(lambda call: call == 6, "a transient failure")
    with kd.Teacher(store, shard_bytes=1, progress=False) as teacher:
        with pytest.raises(RuntimeError, match="transient"):
            teacher.start_knowledge_service(["x"], ["logits"], flaky, batches(100, 10))
        assert 0 < len(kd.StoreReader(store)) < 100
        assert teacher.start_knowledge_service(["x"], ["logits"], flaky, batches(100, 10)) > 0
        teacher.start_knowledge_service(["x"], ["logits"], program, batches(20, 10, 100))
    got = read_all(store)  # complete: the retry covered what the failure left out
    np.testing.assert_array_equal(got["sample_id"], np.arange(120))
    np.testing.assert_allclose(got["logits"], inputs(120) @ W, rtol=1e-6)


def test_dumps_inside_a_with_block_that_raises_leave_the_store_incomplete(tmp_path):
    store = tmp_path / "store"
    with (
        pytest.raises(ValueError, match="bad sample"),
        kd.Teacher(store, progress=False) as teacher,
    ):
        for i, (x,) in enumerate(batches(50, 10)):
            if i == 3:
                raise ValueError("bad sample")
            teacher.dump({"logits": x @ W})
    reader = kd.StoreReader(store)
    assert not reader.complete and len(reader) == 30  # durable, but not complete
    with pytest.raises(kd.StoreError, match="incomplete"):
        read_all(store)


def test_close_from_another_thread_stops_an_offline_dump_and_leaves_a_valid_store(tmp_path):
    store = tmp_path / "store"
    teacher = kd.Teacher(store, shard_bytes=1, progress=False)
    teacher.start()
    started = threading.Event()

    def slow(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started.set()
        time.sleep(0.02)
        return program(feed)

    result: list[object] = []

    def serve() -> None:
        try:
            result.append(
                teacher.start_knowledge_service(["x"], ["logits"], slow, batches(2000, 4))
            )
        except BaseException as exc:  # reported by the test below
            result.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    assert started.wait(30)
    time.sleep(0.3)
    teacher.close()
    assert not thread.is_alive()  # close() waited for the service to stop
    thread.join()
    assert isinstance(result[0], int) and 0 < result[0] < 2000, result
    reader = kd.StoreReader(store)
    reader.verify()
    assert not reader.complete  # stopped early: a re-run resumes it
    assert len(reader) == result[0]
    with pytest.raises(kd.KdserveError, match="closed"):
        teacher.dump({"logits": np.zeros((1, 3), np.float32)})

    with kd.Teacher(store, progress=False) as again:
        again.start_knowledge_service(["x"], ["logits"], program, batches(2000, 4))
    got = read_all(store)
    np.testing.assert_array_equal(got["sample_id"], np.arange(2000))
    np.testing.assert_allclose(got["logits"], inputs(2000) @ W, rtol=1e-6)


def test_schema_as_a_pantheon_mapping_names_each_fields_source(tmp_path):
    store = tmp_path / "store"
    with kd.Teacher(store, progress=False) as teacher:
        teacher.start_knowledge_service(
            feed_list=["x"],
            schema={"inputs": "x", "soft": "logits"},
            program=program,
            reader_config=batches(20, 5),
            exe=None,  # Pantheon's executor argument is accepted
        )
    got = read_all(store)
    assert set(got) == {"sample_id", "inputs", "soft"}
    np.testing.assert_array_equal(got["inputs"], inputs(20))
    np.testing.assert_allclose(got["soft"], inputs(20) @ W, rtol=1e-6)


def test_a_repaired_middle_shard_is_regenerated_by_rerunning_the_dump(tmp_path):
    store = tmp_path / "store"
    with kd.Teacher(store, shard_bytes=1, progress=False) as teacher:  # a shard per batch
        teacher.start_knowledge_service(["x"], ["logits"], program, batches(100, 10))
    middle = kd.StoreReader(store).shards[4].file
    with open(store / middle, "r+b") as f:  # a truncated shard in the middle of the store
        f.truncate(100)
    with (  # resuming finds it and says what to do
        pytest.raises(kd.StoreError, match="verify --repair"),
        kd.Teacher(store, progress=False) as teacher,
    ):
        teacher.start_knowledge_service(["x"], ["logits"], program, batches(100, 10))
    done = subprocess.run(
        [str(Path(sys.executable).with_name("kdserve")), "verify", "--repair", str(store)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (store / (middle + ".damaged")).exists(), done.stdout + done.stderr
    with kd.Teacher(store, progress=False) as teacher:  # writes only the 10 missing samples
        written = teacher.start_knowledge_service(["x"], ["logits"], program, batches(100, 10))
    assert written == 10
    reader = kd.StoreReader(store)
    reader.verify()
    assert reader.complete and len(reader) == 100
    got = read_all(store)
    assert sorted(got["sample_id"].tolist()) == list(range(100))
    order = np.argsort(got["sample_id"])
    np.testing.assert_allclose(got["logits"][order], inputs(100) @ W, rtol=1e-6)


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
@pytest.mark.parametrize("keep", [None, ["logits"]])
def test_a_damaged_last_shard_is_set_aside_when_the_dump_is_rerun(tmp_path, caplog, damage, keep):
    """What the README promises of a dump whose last shard was damaged (a crash, a full
    disk): re-running it sets the shard aside and regenerates its samples, whatever the
    dump keeps."""
    store = tmp_path / "store"
    n = kd.dump(
        program, batches(100, 10), store, feeds=["x"], keep=keep, shard_bytes=1, progress=False
    )
    assert n == 100
    last = kd.StoreReader(store).shards[-1].file
    if damage == "truncated":
        with open(store / last, "r+b") as f:
            f.truncate(100)
    else:
        (store / last).unlink()
    caplog.set_level("WARNING", logger="kdserve")
    again = kd.dump(
        program, batches(100, 10), store, feeds=["x"], keep=keep, shard_bytes=1, progress=False
    )
    assert again == 10  # only the set-aside shard's samples
    assert f"its last shard {last} is" in caplog.text
    assert (store / (last + ".damaged")).exists() == (damage == "truncated")
    reader = kd.StoreReader(store)
    reader.verify()
    assert reader.complete and len(reader) == 100
    got = read_all(store)
    assert sorted(got["sample_id"].tolist()) == list(range(100))


@pytest.mark.parametrize(
    ("first", "second", "says"),
    [
        ({"model": "resnet50"}, {"model": "vit-b16"}, "model 'resnet50'.*'vit-b16'"),
        ({"name": "a"}, {"name": "b"}, "name 'a'.*'b'"),
    ],
)
def test_a_dump_of_another_teacher_never_resumes_a_store(tmp_path, first, second, says):
    """Knowledge of two teachers never mixes in a store: a dump naming another model or
    teacher than the store records is refused, complete store or not, nothing changed."""
    store = tmp_path / "store"
    kd.dump(program, batches(50, 10), store, feeds=["x"], shard_bytes=1, progress=False, **first)
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    with pytest.raises(kd.StoreError, match=says):
        kd.dump(
            program, batches(60, 10), store, feeds=["x"], shard_bytes=1, progress=False, **second
        )
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before
    # the same teacher resumes (and adds the new samples)
    assert kd.dump(program, batches(60, 10), store, feeds=["x"], progress=False, **first) == 10


def test_close_returns_promptly_while_the_program_hangs(tmp_path):
    """close() from another thread ends a dump whose program hangs (a stuck device): the
    service returns what it delivered and the store stays valid and resumable; the hung
    call is left to its thread."""
    teacher = kd.Teacher(tmp_path / "store", shard_bytes=1, progress=False)
    teacher.start()
    release = threading.Event()

    def hangs(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if feed["x"][0, 0] >= 5 * 4 * 4 / 7:  # from the 6th batch of 4 on
            release.wait(60)
        return program(feed)

    result: list[object] = []
    thread = threading.Thread(
        target=lambda: result.append(
            teacher.start_knowledge_service(["x"], ["logits"], hangs, batches(200, 4))
        ),
        daemon=True,
    )
    thread.start()
    time.sleep(1.0)  # 5 batches delivered, the 6th hangs
    started = time.monotonic()
    teacher.close()
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - started < 10
    assert result == [20]
    reader = kd.StoreReader(tmp_path / "store")
    reader.verify()
    assert not reader.complete and len(reader) == 20
    release.set()
