"""The Pythonic API beside Pantheon's: kd.dump, kd.serve / kd.Service, Student.add_store,
Student.add_teacher and the re-iterable Student.loader, on real stores and sockets."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kdserve as kd

N, B, D = 100, 16, 4
X = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)


def batches() -> list[dict[str, np.ndarray]]:
    return [{"x": X[i : i + B]} for i in range(0, N, B)]


def program(feed: dict[str, Any]) -> dict[str, np.ndarray]:
    x = np.asarray(feed["x"])
    return {"logits": 2 * x, "norm": np.linalg.norm(x, axis=1).astype(np.float32)}


def read(loader: kd.Loader) -> dict[str, np.ndarray]:
    got = list(loader)
    return {k: np.concatenate([b[k] for b in got]) for k in got[0]}


def test_dump_keeps_every_output_and_a_loader_reads_passes(tmp_path: Path) -> None:
    written = kd.dump(program, batches(), tmp_path / "t", progress=False)
    assert written == N
    assert kd.StoreReader(tmp_path / "t").complete
    with kd.Student() as student:
        student.add_store(tmp_path / "t")
        loader = student.loader(batch_size=32)
        assert len(loader) == 4  # 100 samples in batches of 32, the last one short
        for _ in range(2):  # re-iterable: each iteration is one more pass
            got = read(loader)
            np.testing.assert_array_equal(got["sample_id"], np.arange(N))
            np.testing.assert_array_equal(got["logits"], 2 * X)
            np.testing.assert_allclose(got["norm"], np.linalg.norm(X, axis=1), rtol=1e-6)
        assert len(student.loader(batch_size=32, drop_last=True)) == 3


def test_dump_takes_tuples_with_feeds_a_one_shot_iterator_and_keep(tmp_path: Path) -> None:
    def one_shot() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(0, N, B):
            yield X[i : i + B], np.arange(i, min(i + B, N)) + 1000

    assert (
        kd.dump(program, one_shot(), tmp_path / "a", feeds=["x", "sample_id"], keep=["logits"]) == N
    )
    reader = kd.StoreReader(tmp_path / "a")
    assert reader.schema.names == ["logits"]
    np.testing.assert_array_equal(reader.sample_ids(), np.arange(N) + 1000)

    generator = (b for b in batches())  # dict batches name their feeds, even one-shot
    assert kd.dump(program, generator, tmp_path / "b", keep={"soft": "logits"}) == N
    assert kd.StoreReader(tmp_path / "b").schema.names == ["soft"]


def test_dump_refuses_what_it_cannot_name(tmp_path: Path) -> None:
    with pytest.raises(kd.SchemaError, match=r"pass feeds=\[names\]"):
        kd.dump(program, [(X[:4],)], tmp_path / "t")
    with pytest.raises(kd.SchemaError, match="Pantheon reader config"):
        kd.dump(program, {"batch_generator": batches}, tmp_path / "t")
    with pytest.raises(kd.SchemaError, match="yielded no batches"):
        kd.dump(program, [], tmp_path / "t")


def test_a_failed_dump_leaves_the_store_incomplete_and_calling_again_completes_it(
    tmp_path: Path,
) -> None:
    calls = 0

    def flaky(feed: dict[str, Any]) -> dict[str, np.ndarray]:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise RuntimeError("GPU fell off the bus")
        return program(feed)

    with pytest.raises(RuntimeError, match="fell off"):
        kd.dump(flaky, batches(), tmp_path / "t", progress=False, buf_size=1)
    assert not kd.StoreReader(tmp_path / "t").complete
    kd.dump(program, batches(), tmp_path / "t", progress=False)
    reader = kd.StoreReader(tmp_path / "t")
    assert reader.complete and len(reader) == N
    np.testing.assert_array_equal(np.sort(reader.sample_ids()), np.arange(N))


def test_serve_runs_in_the_background_and_wait_returns_what_it_served() -> None:
    with kd.serve(program, batches(), times=2, keep=["logits"], progress=False) as service:
        student = kd.Student(connect_timeout=10.0)
        student.add_teacher(service.address)
        loader = student.loader(batch_size=25)
        for _ in range(2):
            got = read(loader)
            np.testing.assert_array_equal(got["sample_id"], np.arange(N))
            np.testing.assert_array_equal(got["logits"], 2 * X)
        assert service.wait(timeout=30) == 2 * N
        student.close()


def test_serve_re_raises_the_services_error_from_wait() -> None:
    def broken(feed: dict[str, Any]) -> dict[str, np.ndarray]:
        raise ValueError("weights not found")

    service = kd.serve(broken, batches(), progress=False)
    try:
        student = kd.Student(connect_timeout=10.0)
        student.add_teacher(service.address)
        with pytest.raises(kd.KdserveError):
            list(student.loader(batch_size=10))
        with pytest.raises(ValueError, match="weights not found"):
            service.wait(timeout=30)
        student.close()
    finally:
        service.close()


def test_a_query_only_service_answers_until_closed() -> None:
    service = kd.serve(program, None, feeds=["x"], keep=["logits"])
    student = kd.Student(connect_timeout=10.0)
    student.add_teacher(service.address)
    student.start()
    out = student.query(0, {"x": X[:5]})
    np.testing.assert_array_equal(out["logits"], 2 * X[:5])
    with pytest.raises(TimeoutError, match="still serving"):
        service.wait(timeout=0.2)
    student.close()
    closer = threading.Thread(target=service.close)
    closer.start()
    assert service.wait(timeout=30) == 5
    closer.join(30)


def test_any_use_starts_the_student_and_registration_then_ends(tmp_path: Path) -> None:
    kd.dump(program, batches(), tmp_path / "t", progress=False)
    student = kd.Student()
    student.add_store(tmp_path / "t")
    assert student.get_knowledge_desc()["logits"]["shape"] == [-1, D]  # no start() needed
    with pytest.raises(kd.KdserveError, match="register every teacher before start"):
        student.add_store(tmp_path / "t", name="again")
    student.close()
    with pytest.raises(kd.KdserveError, match="closed"):
        student.loader(batch_size=8)


def test_limits_bound_what_students_may_send_and_the_teacher_serves_on() -> None:
    with pytest.raises(ValueError, match=r"Limits\(query_bytes=\.\.\.\) must be an int >= 1"):
        kd.Limits(query_bytes=0)
    limits = kd.Limits(message_bytes=2000, query_bytes=10_000)
    with (
        kd.serve(program, None, feeds=["x"], keep=["logits"], limits=limits) as service,
        kd.Student(connect_timeout=10.0) as student,
    ):
        student.add_teacher(service.address)
        with pytest.raises(kd.ProtocolError, match="over the limit of 10000"):
            student.query(0, {"x": np.zeros((1000, D), np.float32)})  # 16 kB
        with pytest.raises(ValueError, match=r"over the limit of 2000 \(the teacher's Limits"):
            student.send({"blob": "x" * 5000})  # refused before it is sent
        np.testing.assert_array_equal(student.query(0, {"x": X[:4]})["logits"], 2 * X[:4])


def test_a_raised_message_limit_holds_from_the_first_message_both_ways() -> None:
    # Students learnt the teacher's limit only when they asked for its info: before,
    # a 6 MB message was refused to send, and dropped when received, at the 4 MiB default.
    big = np.zeros((6 << 20) // 8)
    limits = kd.Limits(message_bytes=32 << 20)
    with (
        kd.serve(program, None, feeds=["x"], limits=limits) as service,
        kd.Student(connect_timeout=10.0) as student,
    ):
        teacher = student.add_teacher(service.address)
        service.teacher.send({"a": big})
        np.testing.assert_array_equal(student.recv(teacher, timeout=10)["a"], big)
        student.send({"b": big})
        np.testing.assert_array_equal(service.teacher.recv(timeout=10)["b"], big)
    # Before the teacher's service starts too (Pantheon's greetings come first).
    with (
        kd.Teacher(out_port=0, limits=limits, progress=False) as early,
        kd.Student(connect_timeout=10.0) as student,
    ):
        early.start()
        teacher = student.add_teacher(early.address)
        early.send({"a": big})
        np.testing.assert_array_equal(student.recv(teacher, timeout=10)["a"], big)
        student.send({"b": big})
        np.testing.assert_array_equal(early.recv(timeout=10)["b"], big)


def test_a_loaders_transform_runs_on_the_prefetch_thread(tmp_path: Path) -> None:
    kd.dump(program, batches(), tmp_path / "t", progress=False)
    threads: set[str] = set()

    def transform(batch: dict[str, Any]) -> int:
        threads.add(threading.current_thread().name)
        return len(batch["sample_id"])

    with kd.Student() as student:
        student.add_store(tmp_path / "t")
        sizes = list(student.loader(batch_size=30, transform=transform))
    assert sizes == [30, 30, 30, 10]
    assert threads == {"kdserve-student"}  # not the training loop's thread


def test_decode_false_delivers_top_k_compactly_and_refuses_its_max(tmp_path: Path) -> None:
    vocab, k = 50, 4
    logits = np.random.default_rng(1).standard_normal((N, vocab)).astype(np.float32)
    keep = kd.Schema([kd.Field("logits", "float32", (vocab,), codec=kd.TopK(k))])
    data = [
        {"x": logits[i : i + B], "sample_id": np.arange(i, min(i + B, N))} for i in range(0, N, B)
    ]
    for name in ("a", "b"):
        kd.dump(lambda f: {"logits": f["x"]}, data, tmp_path / name, keep=keep, progress=False)
    with kd.Student() as student:
        student.add_store(tmp_path / "a")
        batches = list(student.loader(batch_size=32, decode=False))
    parts = batches[0]["logits"]
    assert set(parts) == {"values", "indices", "tail"} and parts["indices"].shape == (32, k)
    top = np.argsort(-logits[:32], axis=1)[:, :k]
    np.testing.assert_array_equal(np.sort(parts["indices"], 1), np.sort(top, 1))
    with kd.Student(merge_strategy={"logits": "max"}) as student:  # "mean" mixes: test_merge_topk
        student.add_store(tmp_path / "a")
        student.add_store(tmp_path / "b")
        with pytest.raises(kd.KdserveError, match=r"decode=False cannot merge coded field"):
            student.loader(batch_size=32, decode=False)
        assert next(iter(student.loader(batch_size=32)))["logits"].shape == (32, vocab)


def test_an_online_teachers_reader_learns_which_pass_it_serves() -> None:
    seen: list[int] = []

    def shuffled(epoch: int) -> list[dict[str, np.ndarray]]:
        seen.append(epoch)
        order = np.random.default_rng(epoch).permutation(N)
        return [{"x": X[order[i : i + B]], "sample_id": order[i : i + B]} for i in range(0, N, B)]

    with kd.serve(program, shuffled, times=2, keep=["logits"], progress=False) as service:
        with kd.Student(connect_timeout=10.0) as student:
            student.add_teacher(service.address)
            loader = student.loader(batch_size=B)
            passes = [read(loader) for _ in range(2)]
        assert service.wait(timeout=30) == 2 * N
    for epoch, got in enumerate(passes):
        order = np.random.default_rng(epoch).permutation(N)
        np.testing.assert_array_equal(got["sample_id"], order)  # the pass's own order
        np.testing.assert_array_equal(got["logits"], 2 * X[order])
    assert 0 in seen and 1 in seen


def test_provenance_is_recorded_required_and_never_mixed(tmp_path: Path) -> None:
    tok = {"tokenizer": "bpe-4096-3f2a", "vocab_size": 4096}
    kd.dump(program, batches(), tmp_path / "a", provenance=tok, progress=False)
    assert kd.StoreReader(tmp_path / "a").teacher["provenance"] == tok
    with kd.Student(expect={"tokenizer": "bpe-4096-3f2a"}) as student:
        student.add_store(tmp_path / "a")
        assert len(list(student.loader(batch_size=50))) == 2
    with kd.Student(expect={"tokenizer": "other"}) as student:
        student.add_store(tmp_path / "a")
        with pytest.raises(kd.StoreError, match=r"records provenance \{'tokenizer': 'bpe-4096"):
            student.start()
    # A dump of other provenance never resumes (mixes into) the store.
    with pytest.raises(kd.StoreError, match="they do not mix"):
        kd.dump(
            program, batches(), tmp_path / "a", provenance={**tok, "vocab_size": 8}, progress=False
        )
    other = {"tokenizer": "sentencepiece-32k", "vocab_size": 32000}
    kd.dump(program, batches(), tmp_path / "b", provenance=other, progress=False)
    with kd.Student(merge_strategy={"logits": "mean", "norm": "mean"}) as student:
        student.add_store(tmp_path / "a")
        student.add_store(tmp_path / "b")
        with pytest.raises(kd.MergeError, match="different vocab_sizes"):
            student.start()
