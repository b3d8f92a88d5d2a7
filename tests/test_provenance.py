"""Provenance (issue #11): stores and online teachers record what makes knowledge comparable
-- provenance, model, kdserve version, codecs -- and a student sees it
(``get_teacher_desc``), requires it of online teachers too (``expect=``), refuses to mix
vocabularies across stores and online teachers, and never lets a kdserve upgrade keep an
interrupted dump from resuming. Peers of protocol version 1 are refused with the fix."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pyarrow import flight

import kdserve as kd
from kdserve.online.client import TeacherClient

N, B, D = 40, 8, 4
X = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)
TOK = {"tokenizer": "bpe-4096-3f2a", "vocab_size": 4096, "temperature": 2.0, "chat": True}
TOPK = kd.Schema([kd.Field("logits", "float32", (D,), codec=kd.TopK(2, kind="logits"))])
# What get_teacher_desc() says of the TOPK field, for a store and an online teacher alike.
FIELDS = {
    "logits": {
        "shape": [-1, D],
        "dtype": "float32",
        "lod_level": 0,
        "codec": TOPK["logits"].codec.to_json(),
    }
}


def batches() -> list[dict[str, np.ndarray]]:
    return [{"x": X[i : i + B]} for i in range(0, N, B)]


def program(feed: dict[str, Any]) -> dict[str, np.ndarray]:
    return {"logits": 2 * np.asarray(feed["x"])}


def samples(loader: kd.Loader) -> int:
    return sum(len(b["sample_id"]) for b in loader)


# -- what is recorded ------------------------------------------------------------------


def test_a_store_records_provenance_model_kdserve_version_and_codecs(tmp_path: Path) -> None:
    kd.dump(
        program, batches(), tmp_path / "t", keep=TOPK, model="toy", provenance=TOK, progress=False
    )
    teacher = kd.StoreReader(tmp_path / "t").teacher
    assert teacher == {"name": "t", "model": "toy", "kdserve_version": kd.__version__} | {
        "provenance": TOK
    }
    with kd.Student() as student:
        student.add_store(tmp_path / "t", name="a")
        assert student.get_teacher_desc() == {
            "a": {
                "store": str(tmp_path / "t"),
                "name": "t",
                "model": "toy",
                "kdserve_version": kd.__version__,
                "provenance": TOK,
                "fields": FIELDS,
            }
        }
        codec = student.get_teacher_desc()["a"]["fields"]["logits"]["codec"]
        assert codec["name"] == "topk" and codec["k"] == 2 and codec["kind"] == "logits"
        assert "codec" not in student.get_knowledge_desc()["logits"]  # merged: decoded


def test_an_online_teacher_reports_what_its_store_records(tmp_path: Path) -> None:
    options: dict[str, Any] = {"keep": TOPK, "name": "lm", "model": "toy", "provenance": TOK}
    with kd.serve(program, batches(), path=tmp_path / "t", progress=False, **options) as service:
        student = kd.Student(connect_timeout=10.0, expect=TOK)
        student.add_teacher(service.address, name="online")
        student.start()
        desc = student.get_teacher_desc()["online"]
        assert samples(student.loader(batch_size=16)) == N
        student.close()
    assert desc == {
        "address": service.address,
        "name": "lm",
        "model": "toy",
        "kdserve_version": kd.__version__,
        "provenance": TOK,
        "fields": FIELDS,
    }
    assert kd.StoreReader(tmp_path / "t").teacher["provenance"] == TOK


# -- expect= of online teachers --------------------------------------------------------


def test_expect_refuses_an_online_teacher_naming_it_the_key_both_values_and_the_fix() -> None:
    with kd.serve(program, batches(), provenance=TOK, progress=False) as service:
        student = kd.Student(connect_timeout=10.0, expect={"tokenizer": "sp-32k", "revision": 2})
        student.add_teacher(service.address, name="big")
        student.start()  # registration and start do not wait for the knowledge service
        with pytest.raises(kd.KdserveError) as refused:
            student.get_knowledge_desc()
        with pytest.raises(kd.KdserveError, match="reports provenance"):
            list(student.loader(batch_size=8))  # refused again, not cached as accepted
        student.close()
    text = str(refused.value)
    assert f"online teacher 'big' at {service.address} reports provenance" in text
    assert "{'tokenizer': 'bpe-4096-3f2a', 'revision': None}" in text
    assert "where the student expects {'tokenizer': 'sp-32k', 'revision': 2}" in text
    assert "serve it with provenance=" in text and "drop those names from expect=" in text
    assert refused.value.teacher == "big"


def test_expect_refuses_a_query_only_teacher_before_its_first_query() -> None:
    with kd.serve(program, None, feeds=["x"], provenance=TOK) as service:
        student = kd.Student(connect_timeout=10.0, expect={"vocab_size": 32000})
        student.add_teacher(service.address)
        with pytest.raises(kd.KdserveError, match=r"\{'vocab_size': 4096\} where the student"):
            student.query(0, {"x": X[:4]})
        student.close()
        student = kd.Student(connect_timeout=10.0, expect={"vocab_size": 4096})
        student.add_teacher(service.address)
        np.testing.assert_array_equal(student.query(0, {"x": X[:4]})["logits"], 2 * X[:4])
        student.close()


def test_messages_flow_before_the_service_runs_whatever_expect_says() -> None:
    """The check waits for the knowledge (Pantheon: messages first, then the service)."""
    teacher = kd.Teacher(out_port=0, provenance={"tokenizer": "a"})
    teacher.start()
    try:
        student = kd.Student(connect_timeout=10.0, expect={"tokenizer": "b"})
        student.add_teacher(teacher.address)
        student.send({"hello": 1})
        assert teacher.recv(timeout=10) == {"hello": 1}
        student.close()
    finally:
        teacher.close()


def test_mixed_vocabularies_are_refused_across_stores_and_online_teachers(tmp_path: Path) -> None:
    kd.dump(program, batches(), tmp_path / "a", provenance=TOK, progress=False)
    other = TOK | {"tokenizer": "sp-32k"}
    strategy = {"logits": "mean"}
    with kd.serve(program, batches(), provenance=other, progress=False) as service:
        student = kd.Student(connect_timeout=10.0, merge_strategy=strategy)
        student.add_teacher(service.address, name="online")
        student.add_store(tmp_path / "a", name="store")
        with pytest.raises(kd.MergeError) as refused:
            list(student.loader(batch_size=8))
        student.close()
    assert "different tokenizers" in str(refused.value)
    assert "'online': 'sp-32k'" in str(refused.value) and "'store': 'bpe-4096" in str(refused.value)
    # Teachers of one vocabulary still merge, online and stored.
    with kd.serve(program, batches(), provenance=TOK, progress=False) as service:
        student = kd.Student(connect_timeout=10.0, merge_strategy=strategy, expect=TOK)
        student.add_teacher(service.address)
        student.add_store(tmp_path / "a")
        assert samples(student.loader(batch_size=8)) == N
        student.close()


def test_two_online_teachers_of_different_vocab_sizes_are_refused() -> None:
    with (
        kd.serve(program, batches(), provenance=TOK, progress=False) as one,
        kd.serve(program, batches(), provenance=TOK | {"vocab_size": 8}, progress=False) as two,
    ):
        student = kd.Student(connect_timeout=10.0, merge_strategy={"logits": "mean"})
        student.add_teacher(one.address)
        student.add_teacher(two.address)
        with pytest.raises(kd.MergeError, match="different vocab_sizes"):
            student.get_knowledge_desc()
        student.close()


# -- what provenance may hold ----------------------------------------------------------


@pytest.mark.parametrize(
    ("provenance", "reason"),
    [
        ({"temperature": math.nan}, "finite float"),
        ({"vocab": [1, 2]}, "str .*int, finite float or bool"),
        ({"": 1}, r"names \(1 to 256 characters\)"),
        ({"tokenizer": "x" * 1025}, r"str \(at most 1024 characters\)"),
        ({f"k{i}": i for i in range(65)}, "holds 65 names .* at most 64 names"),
        ({f"k{i}": "x" * 1000 for i in range(20)}, r"in \d+ bytes of JSON; .* in 16384 bytes"),
    ],
    ids=["nan", "list", "empty-name", "long-text", "many", "large"],
)
def test_provenance_is_refused_unless_an_online_teacher_can_report_it(provenance, reason):
    with pytest.raises(kd.KdserveError, match=reason):
        kd.Teacher(out_port=0, provenance=provenance)


def test_an_online_teachers_model_must_fit_its_info() -> None:
    with pytest.raises(kd.KdserveError, match="model= is 2000 characters; an online teacher"):
        kd.Teacher(out_port=0, model="m" * 2000)


# -- resuming across kdserve versions --------------------------------------------------


def test_a_newer_kdserve_resumes_an_interrupted_dump_and_records_its_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def dies(feed: dict[str, Any]) -> dict[str, np.ndarray]:
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("preempted")
        return program(feed)

    monkeypatch.setattr("kdserve.teacher.teacher.__version__", "0.0.9")
    with pytest.raises(RuntimeError, match="preempted"):
        kd.dump(dies, batches(), tmp_path / "t", provenance=TOK, progress=False, shard_bytes=1)
    reader = kd.StoreReader(tmp_path / "t")
    assert not reader.complete and reader.teacher["kdserve_version"] == "0.0.9"
    held = len(reader)
    assert 0 < held < N
    monkeypatch.undo()
    assert kd.dump(program, batches(), tmp_path / "t", provenance=TOK, progress=False) == N - held
    reader = kd.StoreReader(tmp_path / "t")
    assert reader.complete and len(reader) == N
    assert reader.teacher["kdserve_version"] == kd.__version__  # the version that last wrote
    assert reader.teacher["provenance"] == TOK
    with pytest.raises(kd.StoreError, match="they do not mix"):  # provenance still guards it
        kd.dump(program, batches(), tmp_path / "t", provenance=TOK | {"chat": False})


# -- peers of protocol version 1 -------------------------------------------------------

V1_INFO = (
    b'{"version": 1, "name": "old", "times": 1, "buf_size": 4, "stream": true, "query": false}'
)


class VersionOneTeacher(flight.FlightServerBase):  # type: ignore[misc]
    """What a kdserve teacher of protocol version 1 answers: an info without provenance."""

    def __init__(self) -> None:
        super().__init__("grpc://127.0.0.1:0")

    def do_action(self, context: Any, action: flight.Action) -> Iterator[flight.Result]:
        return iter([flight.Result(V1_INFO)] if action.type == "info" else [])


def test_a_version_1_teacher_is_refused_with_the_upgrade_to_make() -> None:
    server = VersionOneTeacher()
    try:
        student = kd.Student(connect_timeout=5.0, token="t")
        student.add_teacher(f"127.0.0.1:{server.port}", name="old")
        student.start()
        with pytest.raises(kd.ProtocolError) as refused:
            student.get_knowledge_desc()
        student.close()
    finally:
        server.shutdown()
    text = str(refused.value)
    assert "info from teacher 'old'" in text
    assert "version 1, but this kdserve speaks version 2" in text
    assert "upgrade kdserve where version 1 runs" in text


def test_a_version_1_students_request_is_refused_with_the_upgrade_to_make() -> None:
    with kd.serve(program, batches(), progress=False) as service:
        client = TeacherClient(
            service.address, name="new", token=service.token, connect_timeout=5.0
        )
        try:
            with pytest.raises(kd.ProtocolError) as refused:
                client.action("recv", b'{"version": 1, "after": 0}')  # a v1 student's ping
        finally:
            client.close()
        student = kd.Student(connect_timeout=10.0)  # and the teacher serves on
        student.add_teacher(service.address)
        assert samples(student.loader(batch_size=8)) == N
        student.close()
    assert "recv request: it is kdserve protocol version 1, but this kdserve speaks version 2" in (
        str(refused.value)
    )
    assert "upgrade kdserve where version 1 runs" in str(refused.value)
