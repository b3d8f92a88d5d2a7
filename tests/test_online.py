"""Online mode end to end: teachers serve knowledge over Arrow Flight on 127.0.0.1.

Teachers run their knowledge service on a thread of the test process (the ``serve``
fixture); students connect through real sockets. Every wait is bounded: a service thread
that does not return, or a student that hangs, fails the test instead of blocking it.
"""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pyarrow import flight

import kdserve as kd
from _helpers import Background, free_port, wait_for
from kdserve.online.client import TeacherClient
from kdserve.online.messages import decode_message, encode_message
from kdserve.online.protocol import Ticket

TOKEN = "online-test-token"
JOIN = 20.0  # seconds a service thread or a student thread gets to finish
N = 200  # samples; teachers read them in batches of TB (the last one short)
TB = 16
RNG = np.random.default_rng(7)
X = RNG.normal(size=(N, 4)).astype(np.float32)
LABEL = (np.arange(N) * 7 % 11).astype(np.int64)
WA = RNG.normal(size=(4, 5)).astype(np.float32)
WB = RNG.normal(size=(4, 5)).astype(np.float32)
FEEDS = ["x", "label", "sample_id"]


# -- data and programs -------------------------------------------------------------------


def samples(order: Any = None, ids: bool = True) -> Callable[[], Iterator[tuple[Any, ...]]]:
    """A Pantheon sample generator reading the samples in ``order``; with ``ids``, the
    sample ids are a feed, else the teacher numbers samples by reader position."""

    def gen() -> Iterator[tuple[Any, ...]]:
        for i in range(N) if order is None else order:
            yield (X[i], LABEL[i], i) if ids else (X[i], LABEL[i])

    return gen


def within_batches(n: int = N, size: int = TB) -> list[int]:
    """Every reader batch of ``size`` holds the same samples, in reversed order."""
    return [i for start in range(0, n, size) for i in reversed(range(start, min(start + size, n)))]


def reader(order: Any = None, ids: bool = True) -> dict[str, Any]:
    return {"sample_generator": samples(order, ids), "batch_size": TB}


def program_a(feed: dict[str, Any]) -> dict[str, Any]:
    """Logits, and a sequence per sample of label % 4 steps (0 included) of 2 floats."""
    x, label = feed["x"], feed["label"]
    seq = [
        (np.arange(2 * (lab % 4), dtype=np.float32).reshape(-1, 2) * row[0])
        for row, lab in zip(x, label, strict=True)
    ]
    return {"logits": x @ WA, "seq": seq}


def program_b(feed: dict[str, Any]) -> dict[str, Any]:
    """Other logits, features and a sequence of label % 3 + 1 steps (stored as fp16)."""
    x, label = feed["x"], feed["label"]
    bseq = [
        np.full((lab % 3 + 1, 3), row[1], np.float32) for row, lab in zip(x, label, strict=True)
    ]
    return {"logits": x @ WB, "feat": np.tanh(x), "bseq": bseq}


A = {"schema": ["logits", "seq", "label"], "program": program_a}
B = {
    "schema": ["logits", "feat", "bseq"],
    "program": program_b,
    "use_fp16": True,
    "feed_list": ["x", "label"],  # no sample_id feed: B's ids are its reader positions
}
MERGE = {"logits": "mean"}


# -- teachers on threads ---------------------------------------------------------------


class Service:
    """A started teacher and its ``start_knowledge_service`` call, run on a thread."""

    def __init__(self, teacher: kd.Teacher, kwargs: dict[str, Any]) -> None:
        self.teacher = teacher
        self.result: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(kwargs,), daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return self.teacher.address

    def _run(self, kwargs: dict[str, Any]) -> None:
        try:
            self.result = self.teacher.start_knowledge_service(**kwargs)
        except BaseException as exc:  # reported by wait()
            self.error = exc

    def wait(self, timeout: float = JOIN) -> int | None:
        """The service's return value, once it returned by itself within ``timeout``."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"teacher {self.teacher.name} did not finish serving"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def serve() -> Iterator[Callable[..., Service]]:
    """``serve(program=..., schema=..., reader_config=..., **service_and_teacher_kwargs)``
    starts a teacher on a free port of 127.0.0.1 and its service on a thread; every
    teacher is closed and its thread joined (with a timeout) at teardown."""
    services: list[Service] = []
    teachers: list[kd.Teacher] = []
    service_keys = {"buf_size", "use_fp16", "times", "feed_list", "num_postprocess_threads"}

    def start(
        program: Callable[..., Any] = program_a,
        schema: Any = ("logits",),
        reader_config: Any = None,
        **kwargs: Any,
    ) -> Service:
        service = {k: kwargs.pop(k) for k in list(kwargs) if k in service_keys}
        kwargs.setdefault("token", TOKEN)
        teacher = kd.Teacher(out_port=kwargs.pop("out_port", 0), progress=False, **kwargs)
        teachers.append(teacher)
        teacher.start()
        service.setdefault("feed_list", FEEDS)
        services.append(
            Service(
                teacher,
                {"schema": list(schema), "program": program, "reader_config": reader_config}
                | service,
            )
        )
        return services[-1]

    yield start
    # close() waits for the calls in progress: if one hangs, the test fails (not blocks).
    closing = [threading.Thread(target=t.close, daemon=True) for t in teachers]
    for c in closing:
        c.start()
    for c in closing:
        c.join(JOIN)
    assert not any(c.is_alive() for c in closing), "teacher.close() hung"
    for s in services:
        s.thread.join(JOIN)
    assert not [s.teacher.name for s in services if s.thread.is_alive()], "a service hung"


def served(serve: Callable[..., Service], spec: dict[str, Any], **kwargs: Any) -> Service:
    kwargs.setdefault("reader_config", reader(ids="sample_id" in spec.get("feed_list", FEEDS)))
    return serve(**spec, **kwargs)


def dump(path: Any, spec: dict[str, Any], order: Any = None) -> None:
    spec = {"feed_list": FEEDS} | spec
    config = reader(order, ids="sample_id" in spec["feed_list"])
    with kd.Teacher(path, progress=False) as teacher:
        teacher.start_knowledge_service(reader_config=config, **spec)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("online-stores")
    dump(root / "a", A)
    dump(root / "b", B)
    dump(root / "c", A, order=within_batches())  # other order, same reader batches
    dump(root / "d", B | {"feed_list": FEEDS}, order=list(reversed(range(N))))  # across batches
    return root


def student(teachers: list[tuple[str, Any]], **kwargs: Any) -> kd.Student:
    """A started student with ``(name, store path or Service)`` teachers, in order."""
    kwargs.setdefault("token", TOKEN)
    kwargs.setdefault("connect_timeout", 10.0)
    s = kd.Student(merge_strategy=kwargs.pop("merge_strategy", MERGE), **kwargs)
    for name, where in teachers:
        if isinstance(where, Service):
            s.register_teacher(in_address=where.address, name=name)
        else:
            s.register_teacher(in_path=where, name=name)
    s.start()
    return s


def in_thread(fn: Callable[[], Any], timeout: float = JOIN) -> Any:
    """``fn()`` run on a thread waited for with a timeout: a hang fails, errors are raised here."""
    return Background(fn).result(timeout)


def read_pass(s: kd.Student, batch_size: int = 24, passes: int = 1) -> list[list[dict[str, Any]]]:
    """``passes`` passes of merged batches, read on a thread joined with a timeout."""
    generator = s.get_knowledge_generator(batch_size)
    return in_thread(lambda: [list(generator()) for _ in range(passes)])


def read_one(s: kd.Student, batch_size: int = 24) -> list[dict[str, Any]]:
    return read_pass(s, batch_size)[0]


def ids_of(batches: list[dict[str, Any]]) -> np.ndarray:
    return np.concatenate([b["sample_id"] for b in batches])


def assert_identical(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """Same batches, fields, dtypes, shapes and bits (sequences: same offsets and values)."""
    assert [len(b["sample_id"]) for b in got] == [len(b["sample_id"]) for b in want]
    for g, w in zip(got, want, strict=True):
        assert list(g) == list(w)
        for name, expected in w.items():
            value = g[name]
            if isinstance(expected, kd.Ragged):
                assert isinstance(value, kd.Ragged), name
                np.testing.assert_array_equal(value.offsets, expected.offsets)
                value, want = value.values, expected.values
            else:
                want = expected
            assert (value.dtype, value.shape) == (want.dtype, want.shape), name
            assert value.tobytes() == want.tobytes(), f"field {name!r} differs"


def sequences(batches: list[dict[str, Any]], name: str) -> list[np.ndarray]:
    return [seq for b in batches for seq in b[name]]


def check_ab(batches: list[dict[str, Any]]) -> None:
    """The merged knowledge of teachers A and B is what their programs compute."""
    ids = ids_of(batches)
    np.testing.assert_array_equal(ids, np.arange(N))
    assert {k: v.dtype for k, v in batches[0].items()} == {
        "sample_id": np.int64,
        "logits": np.float32,
        "seq": np.float32,
        "label": np.int64,
        "feat": np.float32,
        "bseq": np.float32,
    }
    logits = np.concatenate([b["logits"] for b in batches])
    b16 = (X @ WB).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(logits, (X @ WA + b16) / 2, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), LABEL)
    feat = np.concatenate([b["feat"] for b in batches])
    np.testing.assert_array_equal(feat, np.tanh(X).astype(np.float16).astype(np.float32))
    seq, bseq = sequences(batches, "seq"), sequences(batches, "bseq")
    assert [len(s) for s in seq] == (LABEL % 4).tolist()
    assert [len(s) for s in bseq] == (LABEL % 3 + 1).tolist()
    for i in range(N):
        want = np.arange(2 * (LABEL[i] % 4), dtype=np.float32).reshape(-1, 2) * X[i, 0]
        np.testing.assert_array_equal(seq[i], want)
        np.testing.assert_array_equal(bseq[i], np.float32(np.float16(X[i, 1])))


# -- 1. online, offline and hybrid students agree ---------------------------------------


def test_online_offline_and_hybrid_merge_identically(serve, stores):
    offline = read_one(student([("A", stores / "a"), ("B", stores / "b")]))
    check_ab(offline)
    assert len(offline) == 9  # 200 samples in batches of 24: 8 full, 1 of 8

    a, b = served(serve, A), served(serve, B)
    online = read_one(student([("A", a), ("B", b)]))
    assert_identical(online, offline)
    assert a.wait() == N and b.wait() == N  # both served the whole pass, then returned

    a = served(serve, A)
    hybrid = read_one(student([("A", a), ("B", stores / "b")]))
    assert_identical(hybrid, offline)
    assert a.wait() == N


def test_online_teachers_in_another_order_within_batches_are_aligned_by_id(serve, stores):
    # C reads every reader batch in reverse order: its batches hold the same ids as A's,
    # so the student realigns each one to the first teacher's order.
    merge = {"logits": "max", "seq": kd.Take("C"), "label": kd.Take("A")}
    offline = read_one(
        student([("A", stores / "a"), ("C", stores / "c")], merge_strategy=merge), 32
    )
    np.testing.assert_array_equal(ids_of(offline), np.arange(N))
    a, c = served(serve, A), served(serve, A, reader_config=reader(within_batches()))
    online = read_one(student([("A", a), ("C", c)], merge_strategy=merge), 32)
    assert_identical(online, offline)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in online]), LABEL)
    np.testing.assert_allclose(np.concatenate([b["logits"] for b in online]), X @ WA, rtol=1e-6)
    assert a.wait() == N and c.wait() == N

    # C first: its order drives; the stored A is looked up by id. Same as offline.
    c = served(serve, A, reader_config=reader(within_batches()))
    hybrid = read_one(student([("C", c), ("A", stores / "a")], merge_strategy=merge), 32)
    offline = read_one(
        student([("C", stores / "c"), ("A", stores / "a")], merge_strategy=merge), 32
    )
    assert ids_of(hybrid).tolist() == within_batches()
    assert_identical(hybrid, offline)
    assert c.wait() == N


def test_online_teachers_in_another_order_across_batches_are_refused(serve, stores):
    # D reads the samples reversed: the first batches of A and D hold other ids. Online,
    # nothing can realign that; the student must refuse, not merge the wrong rows.
    d = served(serve, B | {"feed_list": FEEDS}, reader_config=reader(list(reversed(range(N)))))
    a = served(serve, A)
    s = student([("A", a), ("D", d)])
    with pytest.raises(kd.AlignmentError, match="hold different samples") as info:
        read_one(s, 32)
    assert info.value.teachers == ("A", "D")
    assert info.value.sample_ids == (0, N - 1)

    # Hybrid: the stored teacher is looked up by id, whatever its order.
    a = served(serve, A)
    hybrid = read_one(student([("A", a), ("B", stores / "d")]))
    offline = read_one(student([("A", stores / "a"), ("B", stores / "b")]))
    assert_identical(hybrid, offline)
    assert a.wait() == N


def test_student_may_connect_before_the_teacher_serves():
    # The student knocks on a port nobody listens on yet, then on a teacher that listens
    # but has not started its service: it waits for both (it must not take the teacher
    # for a query-only one), then reads the whole pass.
    port = free_port()
    s = kd.Student(token=TOKEN, connect_timeout=10.0)
    s.register_teacher(in_address=f"127.0.0.1:{port}", name="A")
    started = threading.Event()
    errors: list[BaseException] = []

    def start() -> None:
        try:
            s.start()  # returns at once: messages may flow before the service starts
            s.get_knowledge_desc()  # waits for the service (the schema)
            started.set()
        except BaseException as exc:
            errors.append(exc)

    starter = threading.Thread(target=start, daemon=True)
    starter.start()
    teacher = kd.Teacher(out_port=port, token=TOKEN, progress=False)
    try:
        time.sleep(0.3)
        teacher.start()
        started.wait(0.7)
        assert not errors  # e.g. taking the teacher for one with nothing to merge
        assert not started.is_set(), "the student read a schema from a teacher with no service"
        service = Service(teacher, {"feed_list": FEEDS, "reader_config": reader(), **A})
        assert started.wait(JOIN), errors
        assert s.get_knowledge_desc()["logits"] == {
            "shape": [-1, 5],
            "dtype": "float32",
            "lod_level": 0,
        }
        assert s.get_knowledge_desc()["seq"]["lod_level"] == 1
        np.testing.assert_array_equal(ids_of(read_one(s)), np.arange(N))
        assert service.wait() == N
    finally:
        teacher.close()
        starter.join(JOIN)
    assert not errors


# -- 2. serving and storing at once -------------------------------------------------------


def test_teacher_serves_and_stores_at_once(serve, tmp_path):
    both = served(serve, B, out_path=tmp_path / "b", times=2)
    s = student([("B", both)], merge_strategy={})
    first, second = read_pass(s, passes=2)
    assert both.wait() == 2 * N  # samples served over both passes
    assert_identical(second, first)
    both.teacher.close()  # completes the store (its last shard and manifest)
    store = kd.StoreReader(tmp_path / "b")
    assert store.complete and len(store) == N  # pass 0, exactly once
    np.testing.assert_array_equal(store.sample_ids(), np.arange(N))
    assert store.schema.names == ["logits", "feat", "bseq"]
    stored = read_one(student([("B", tmp_path / "b")], merge_strategy={}))
    assert_identical(stored, first)


# -- 3. authentication ------------------------------------------------------------------


def test_wrong_or_missing_token_is_refused_and_the_teacher_keeps_serving(
    serve, caplog, monkeypatch
):
    monkeypatch.delenv("KDSERVE_TOKEN", raising=False)
    a = served(serve, A, name="guarded")
    caplog.set_level(logging.WARNING, logger="kdserve")
    wrong = kd.Student(token="not-the-token", connect_timeout=5.0)
    wrong.register_teacher(in_address=a.address, name="A")
    t0 = time.monotonic()
    with pytest.raises(
        kd.AuthenticationError, match=r"'A' at 127\.0\.0\.1:\d+ refused the token"
    ) as refused:
        wrong.start()
    assert refused.value.teacher == "A"
    assert time.monotonic() - t0 < 4.0  # refused at once, not retried until the timeout
    assert re.search(r"teacher guarded: refused a \S+ call with a wrong token", caplog.text)
    assert "not-the-token" not in caplog.text  # the log never shows a token

    # This teacher was given its token, so it published none for same-host students:
    # a student without one waits for it (the teacher may be starting), then says so.
    nobody = kd.Student(connect_timeout=1.0)
    nobody.register_teacher(in_address=a.address, name="A")
    with pytest.raises(kd.AuthenticationError, match="no token for teacher") as info:
        nobody.start()
    assert info.value.teacher == "A"

    raw = flight.FlightClient(f"grpc://{a.address}")  # a Flight call with no token at all
    with pytest.raises(flight.FlightUnauthenticatedError):
        list(raw.do_action(flight.Action("info", b"")))
    raw.close()
    assert re.search(r"teacher guarded: refused a \S+ call with a missing token", caplog.text)

    np.testing.assert_array_equal(ids_of(read_one(student([("A", a)]))), np.arange(N))
    assert a.wait() == N


def test_token_from_the_environment_works_for_both_sides(serve, capfd, monkeypatch):
    monkeypatch.setenv("KDSERVE_TOKEN", "from-env")
    a = served(serve, A, token=None)
    assert a.teacher.token == "from-env"
    assert "token" not in capfd.readouterr().err  # a given token is never printed
    s = kd.Student(connect_timeout=10.0)
    s.register_teacher(in_address=a.address)
    s.start()
    np.testing.assert_array_equal(ids_of(read_one(s)), np.arange(N))
    assert a.wait() == N


def test_teacher_without_a_token_makes_one_and_never_logs_it(serve, caplog, monkeypatch):
    monkeypatch.delenv("KDSERVE_TOKEN", raising=False)
    with caplog.at_level(logging.INFO, logger="kdserve"):
        a = served(serve, A, token=None)
    token = a.teacher.token
    assert token is not None and len(token) >= 16
    found = re.search(
        rf"teacher \S+ serving on {re.escape(a.address)}; its token is in (\S+)", caplog.text
    )
    assert found, caplog.text
    assert token not in caplog.text  # a generated token is published in a 0600 file, not logged
    assert Path(found.group(1)).read_text().strip() == token
    with pytest.raises(kd.AuthenticationError):
        student([("A", a)], token=token + "x")
    np.testing.assert_array_equal(ids_of(read_one(student([("A", a)], token=token))), np.arange(N))
    assert a.wait() == N


@pytest.mark.parametrize(("env", "given"), [(None, None), ("", None), ("  ", ""), (None, " \t")])
def test_teacher_beyond_loopback_without_a_token_is_refused_before_binding(monkeypatch, env, given):
    """No token, and a blank one (an empty KDSERVE_TOKEN, token=" "), is no token."""
    if env is None:
        monkeypatch.delenv("KDSERVE_TOKEN", raising=False)
    else:
        monkeypatch.setenv("KDSERVE_TOKEN", env)
    port = free_port()
    teacher = kd.Teacher(out_port=port, host="0.0.0.0", token=given, progress=False)
    try:
        with pytest.raises(kd.KdserveError, match=r"0\.0\.0\.0 without a token"):
            teacher.start()
        # Nothing listens on the port: a teacher bound to 0.0.0.0 would accept this.
        with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", port))
        assert teacher.token is None  # no token was made up for it either
    finally:
        teacher.close()


# -- 4. TLS -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls() -> dict[str, bytes]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    return {
        "cert": cert.cert_chain_pems[0].bytes(),
        "key": cert.private_key_pem.bytes(),
        "ca": ca.cert_pem.bytes(),
        "other_ca": trustme.CA().cert_pem.bytes(),
    }


def test_tls_teacher_serves_a_student_that_trusts_its_ca(serve, tls):
    a = served(serve, A, tls_cert=tls["cert"], tls_key=tls["key"])
    for roots, what in ((None, "plain grpc"), (tls["other_ca"], "another CA")):
        t0 = time.monotonic()
        with pytest.raises(kd.TeacherUnavailableError, match="did not answer") as info:
            student([("A", a)], tls_root_certs=roots, connect_timeout=1.0)
        assert time.monotonic() - t0 < 8.0, what
        assert info.value.teacher == "A"
    batches = read_one(student([("A", a)], tls_root_certs=tls["ca"]))
    np.testing.assert_array_equal(ids_of(batches), np.arange(N))
    np.testing.assert_allclose(np.concatenate([b["logits"] for b in batches]), X @ WA, rtol=1e-6)
    assert a.wait() == N


def test_tls_from_files_and_both_parts_needed(serve, tls, tmp_path):
    with pytest.raises(kd.KdserveError, match="both tls_cert= and tls_key="):
        kd.Teacher(out_port=0, token=TOKEN, tls_cert=tls["cert"])
    (tmp_path / "cert.pem").write_bytes(tls["cert"])
    (tmp_path / "key.pem").write_bytes(tls["key"])
    a = served(serve, A, tls_cert=tmp_path / "cert.pem", tls_key=str(tmp_path / "key.pem"))
    batches = read_one(student([("A", a)], tls_root_certs=tls["ca"]))
    np.testing.assert_array_equal(ids_of(batches), np.arange(N))
    assert a.wait() == N


# -- 5. data-parallel students -------------------------------------------------------------


def run_ranks(make: Callable[[int], kd.Student], ranks: int, passes: int) -> list[list[Any]]:
    """Each rank's passes, read by one thread per rank, all joined with a timeout."""
    results: list[list[Any]] = [[] for _ in range(ranks)]
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            s = make(rank)
            reader = s.get_knowledge_generator(batch_size=10)
            for _ in range(passes):
                results[rank].append(list(reader()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    if errors:
        raise errors[0]
    return results


def teacher_batches(rank: int, world: int) -> np.ndarray:
    """Ids of the reader batches ``rank, rank + world, ...`` (ids are reader positions)."""
    starts = range(rank * TB, N, world * TB)
    return np.concatenate([np.arange(s, min(s + TB, N)) for s in starts])


@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_students_share_every_pass(serve, world):
    positions = A | {"feed_list": ["x", "label"]}  # ids: reader positions, in every pass
    a = served(serve, positions, times=2, student_grace=5.0)
    results = run_ranks(
        lambda r: student([("A", a)], rank=r, world_size=world, even_ranks="none"),
        ranks=world,
        passes=2,
    )
    for p in range(2):
        shares = [ids_of(results[r][p]) for r in range(world)]
        for r in range(world):
            np.testing.assert_array_equal(shares[r], teacher_batches(r, world))
        assert sorted(np.concatenate(shares).tolist()) == list(range(N))  # each exactly once
        for r in range(world):
            logits = np.concatenate([b["logits"] for b in results[r][p]])
            np.testing.assert_allclose(logits, X[shares[r]] @ WA, rtol=1e-6)
    assert a.wait() == 2 * N


def test_rank_and_world_size_default_to_the_environment(serve, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    a = served(serve, A, student_grace=5.0)

    def make(rank: int) -> kd.Student:
        # Rank 1 from RANK/WORLD_SIZE; rank 0 given explicitly (over the environment).
        if rank == 1:
            return student([("A", a)], even_ranks="none")
        return student([("A", a)], rank=0, world_size=2, even_ranks="none")

    results = run_ranks(make, ranks=2, passes=1)
    np.testing.assert_array_equal(ids_of(results[1][0]), teacher_batches(1, 2))
    np.testing.assert_array_equal(ids_of(results[0][0]), teacher_batches(0, 2))
    assert a.wait() == N


# -- 6. query mode ------------------------------------------------------------------------


def query_program(feed: dict[str, Any]) -> dict[str, Any]:
    if np.any(feed["x"] < -100):
        raise kd.SchemaError("x must be >= -100")
    return {"logits": feed["x"] @ WA, "norm": np.linalg.norm(feed["x"], axis=1)}


def test_query_mode(serve):
    stream = served(serve, A)  # a teacher with a reader also answers queries
    only = serve(query_program, ["logits", "norm"], None, feed_list=["x"])
    s = student([("A", stream), ("Q", only)], merge_strategy={})
    assert set(s.get_knowledge_desc()) == {"logits", "seq", "label"}  # Q has no stream

    got = s.query(1, {"x": X[:10]})
    assert list(got) == ["sample_id", "logits", "norm"]
    np.testing.assert_array_equal(got["sample_id"], np.arange(10))
    np.testing.assert_allclose(got["logits"], X[:10] @ WA, rtol=1e-6)
    np.testing.assert_allclose(got["norm"], np.linalg.norm(X[:10], axis=1), rtol=1e-6)
    got = s.query(1, {"x": X[[5, 3]], "sample_id": np.array([105, 103])})
    np.testing.assert_array_equal(got["sample_id"], [105, 103])
    np.testing.assert_allclose(got["logits"], X[[5, 3]] @ WA, rtol=1e-6)

    sizes = [1 + i % 7 for i in range(60)]
    starts = np.cumsum([0, *sizes])
    inputs = [
        {"x": X[(starts[i] + np.arange(n)) % N], "sample_id": np.arange(n) + 1000 * i}
        for i, n in enumerate(sizes)
    ]
    results = in_thread(lambda: list(s.query_stream(1, inputs, max_in_flight=4)))
    assert len(results) == len(inputs)
    for sent, got in zip(inputs, results, strict=True):  # in input order
        np.testing.assert_array_equal(got["sample_id"], sent["sample_id"])
        np.testing.assert_allclose(got["logits"], sent["x"] @ WA, rtol=1e-6)

    # The streaming teacher answers with its own schema (and label is a feed it needs).
    got = s.query(0, {"x": X[:4], "label": LABEL[:4]})
    np.testing.assert_array_equal(got["label"], LABEL[:4])
    assert [len(q) for q in got["seq"]] == (LABEL[:4] % 4).tolist()

    np.testing.assert_array_equal(ids_of(read_one(s)), np.arange(N))
    assert stream.wait() == N
    assert only.thread.is_alive()  # a query-only service runs until close()
    only.teacher.close()
    assert only.wait() == 10 + 2 + sum(sizes)  # the samples it answered


@pytest.fixture
def asked(serve) -> tuple[Service, kd.Student]:
    """A query-only teacher, and a started student whose only teacher it is."""
    only = serve(query_program, ["logits", "norm"], None, feed_list=["x"])
    return only, student([("Q", only)])


def test_a_query_streams_batches_share_their_input_types(asked):
    # A change within one stream was pyarrow's "different schema" error.
    _, s = asked
    unlike = [{"x": X[:2]}, {"x": X[:2].astype(np.float64)}]
    with pytest.raises(kd.SchemaError, match=r"query batch 1 gives input 'x' as fixed_size"):
        in_thread(lambda: list(s.query_stream(0, unlike)))
    np.testing.assert_allclose(s.query(0, {"x": X[:3]})["logits"], X[:3] @ WA, rtol=1e-6)


def test_a_query_only_student_has_no_stream(asked):
    only, s = asked
    with pytest.raises(kd.KdserveError, match="only answer queries"):
        s.get_knowledge_generator(8)
    with pytest.raises(kd.KdserveError, match="only answer queries"):
        s.get_knowledge_desc()
    with pytest.raises(TypeError, match=r"a query batch is a dict of input arrays"):
        s.query(0, [1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(kd.SchemaError, match=r"a query batch needs at least one input"):
        s.query(0, {})
    s.query(0, {"x": X[:2]})  # a query's answer tells the teacher its schema; still no stream:
    client = TeacherClient(only.address, name="Q", token=TOKEN, connect_timeout=5.0)
    with pytest.raises(kd.ProtocolError, match="serves queries only; it has no knowledge stream"):
        list(client.stream_pass(0, 0, 1, 1))
    client.close()


@pytest.mark.parametrize(
    ("inputs", "error", "message"),
    [
        (
            {"x": np.full((3, 4), -1000, np.float32)},
            kd.SchemaError,
            "query refused: x must be >= -100",
        ),
        ({"y": X[:3]}, kd.SchemaError, r"query refused: the query lacks feed\(s\) \['x'\]"),
        ({"x": X[:3, :2]}, kd.KdserveError, "program failed on a query: ValueError"),  # matmul
    ],
    ids=["program-refuses", "missing-feed", "program-fails"],
)
def test_bad_queries_get_clear_errors(asked, inputs, error, message):
    """The teacher's error reaches the student as the same kdserve exception class."""
    _, s = asked
    t0 = time.monotonic()
    with pytest.raises(error, match=message) as info:
        in_thread(lambda: s.query(0, inputs), timeout=10.0)
    assert type(info.value) is error and info.value.teacher == "Q"
    assert time.monotonic() - t0 < 5.0
    assert "Traceback" not in str(info.value)  # the teacher's traceback stays with it
    got = s.query(0, {"x": X[:2]})  # and the teacher goes on answering
    np.testing.assert_allclose(got["logits"], X[:2] @ WA, rtol=1e-6)


QUERY_TEACHER = """
import sys
import kdserve as kd
teacher = kd.Teacher(out_port=int(sys.argv[1]), token=sys.argv[2], progress=False)
teacher.start()
teacher.start_knowledge_service(["x"], ["y"], lambda feed: {"y": feed["x"] * 2}, None)
"""


def test_a_query_stream_whose_input_fails_does_not_hang(tmp_path):
    # The teacher runs in a process of its own: if the student did hang, its unfinished
    # exchange would keep an in-process teacher's close() (and this process) waiting.
    port = free_port()
    log = open(tmp_path / "teacher.log", "wb")  # noqa: SIM115 -- closed below
    teacher = subprocess.Popen(
        [sys.executable, "-c", QUERY_TEACHER, str(port), TOKEN], stdout=log, stderr=log
    )
    try:
        s = kd.Student(token=TOKEN, connect_timeout=20.0)
        s.register_teacher(in_address=f"127.0.0.1:{port}")
        in_thread(s.start)

        def inputs() -> Iterator[dict[str, Any]]:
            yield {"x": X[:2]}
            yield {"x": X[2:4]}
            time.sleep(0.3)  # the student is waiting for more results by now
            yield {"x": np.array(["not", "numbers"])}

        for in_flight in (1, 4):
            t0 = time.monotonic()
            with pytest.raises(kd.SchemaError, match="knowledge must be bool, integer or float"):
                in_thread(lambda n=in_flight: list(s.query_stream(0, inputs(), n)), 10.0)
            assert time.monotonic() - t0 < 5.0
        got = s.query(0, {"x": X[:3]})  # the exchange was ended; the teacher goes on
        np.testing.assert_array_equal(got["y"], X[:3] * 2)
        assert teacher.poll() is None
    finally:
        teacher.kill()
        teacher.wait(JOIN)
        log.close()


# -- 7. messages --------------------------------------------------------------------------


def assert_same_message(got: Any, want: Any) -> None:
    """Equal values; arrays with the same dtype, shape and bits."""
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray)
        assert (got.dtype, got.shape) == (want.dtype, want.shape)
        assert got.tobytes() == np.ascontiguousarray(want).tobytes()
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for k in want:
            assert_same_message(got[k], want[k])
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same_message(g, w)
    else:
        assert type(got) is type(want) and got == want


MESSAGE = {
    "step": 3,
    "lr": 0.25,
    "tag": "warmup",
    "done": False,
    "none": None,
    "logits": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "nested": [
        {"ids": np.array([5, -1, 2**40], np.int64), "mask": np.array([True, False])},
        [np.float16([0.5, -2.0, 65504.0]), np.zeros((2, 0, 3), np.float64)],
        np.array(7, np.int32),
    ],
}


def test_messages_travel_both_ways(serve):
    only = serve(query_program, ["logits", "norm"], None, feed_list=["x"])
    s = student([("Q", only)])
    teacher = only.teacher

    teacher.send(MESSAGE)
    teacher.send({"step": 4})
    assert_same_message(s.recv(0, timeout=5.0), MESSAGE)
    assert s.recv(0, timeout=5.0) == {"step": 4}  # in sending order, each once

    s.send({"loss": np.float32(0.5), "grad": MESSAGE["logits"].T}, teacher_ids=[0])
    s.send(["second", 2])
    got = teacher.recv(timeout=5.0)
    assert got["loss"] == 0.5
    assert_same_message(got["grad"], np.ascontiguousarray(MESSAGE["logits"].T))
    assert teacher.recv(timeout=5.0) == ["second", 2]


def test_messages_refuse_what_json_and_numpy_cannot_hold(serve):
    only = serve(query_program, ["logits", "norm"], None, feed_list=["x"])
    s = student([("Q", only)])

    class Custom:
        pass

    for value in (
        {1, 2},
        {"a": Custom()},
        [np.array([object()], dtype=object)],
        b"bytes",
        [{1: "x"}],  # JSON would make it {"1": "x"}
    ):
        with pytest.raises(TypeError, match="cannot be sent"):
            only.teacher.send(value)
        with pytest.raises(TypeError, match="cannot be sent"):
            s.send(value, teacher_ids=[0])
    with pytest.raises(kd.KdserveError, match="no teacher 1"):
        s.send("hello", teacher_ids=[1])
    with pytest.raises(TimeoutError):  # nothing refused went out, not even in part
        only.teacher.recv(timeout=0.3)
    with pytest.raises(TimeoutError):
        s.recv(0, timeout=0.3)


def test_recv_timeouts(serve):
    only = serve(query_program, ["logits", "norm"], None, feed_list=["x"])
    s = student([("Q", only)])
    for recv, what in (
        (lambda: s.recv(0, timeout=0.6), "student"),
        (lambda: only.teacher.recv(timeout=0.6), "teacher"),
    ):
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"within 0\.6 s"):
            in_thread(recv, timeout=10.0)
        assert 0.5 <= time.monotonic() - t0 < 3.0, what
    only.teacher.send("late")
    assert s.recv(0, timeout=5.0) == "late"


@pytest.mark.parametrize(
    "value",
    [
        np.array(3.5, np.float64),  # 0-d
        np.zeros((0,), np.float32),
        np.zeros((3, 0), np.int64),
        np.array([True, False, True]),
        np.array([np.iinfo(np.int64).min, -1, np.iinfo(np.int64).max]),
        np.array([[1.5, -0.0], [np.inf, 65504.0]], np.float16),
        np.arange(6, dtype=np.uint8).reshape(2, 3)[:, ::2],  # not contiguous
        np.array([1 + 2j], np.complex64),
        np.arange(4, dtype=">i4"),  # big-endian stays big-endian
    ],
    ids=lambda v: f"{v.dtype.str}{list(v.shape)}",
)
def test_message_arrays_round_trip(value):
    got = decode_message(encode_message({"a": [value]}))
    assert_same_message(got, {"a": [value]})
    assert got["a"][0].flags.writeable  # a copy, not a view of the message bytes


def test_message_values_round_trip():
    message = {"n": np.int64(3), "f": np.float32(0.25), "b": np.bool_(True), "s": "é", "l": []}
    assert decode_message(encode_message(message)) == {
        "n": 3,
        "f": 0.25,
        "b": True,
        "s": "é",
        "l": [],
    }
    nan = decode_message(encode_message([float("nan"), float("inf")]))
    assert np.isnan(nan[0]) and nan[1] == float("inf")


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe",  # not UTF-8
        b"not json",
        b'{"__ndarray__": {"dtype": "|O", "shape": [1], "data": "AAAAAAAAAAA="}}',  # objects
        b'{"__ndarray__": {"dtype": "<U1", "shape": [1], "data": "YQAAAA=="}}',  # strings
        b'{"__ndarray__": {"dtype": "<f4", "shape": [3], "data": "AAAAAA=="}}',  # too short
        b'{"__ndarray__": {"dtype": "<f4", "shape": [1]}}',  # no data
        b'{"__ndarray__": {"dtype": "<f4", "shape": [1], "data": "!!"}}',  # not base64
        b'{"__ndarray__": {"dtype": "nonsense", "shape": [1], "data": ""}}',
    ],
)
def test_decode_refuses_anything_but_kdserve_json(data):
    with pytest.raises(kd.ProtocolError, match=r"not kdserve JSON|numbers only"):
        decode_message(data)


# -- 8. errors and backpressure ------------------------------------------------------------


def test_port_already_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        teacher = kd.Teacher(out_port=port, token=TOKEN, progress=False)
        try:
            with pytest.raises(kd.KdserveError, match=rf"cannot listen on 127.0.0.1:{port}.*taken"):
                teacher.start()
        finally:
            teacher.close()


def test_more_passes_than_times_is_refused(serve):
    a = served(serve, A, times=1)
    s = student([("A", a)])
    generator = s.get_knowledge_generator(50)
    assert ids_of(in_thread(lambda: list(generator()))).tolist() == list(range(N))
    with pytest.raises(kd.KdserveError, match=r"serves 1 pass\(es\) \(its times=\)"):
        in_thread(lambda: list(generator()))
    assert a.wait() == N


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:", ":8470", "127.0.0.1:port"])
def test_address_must_be_host_and_port(address):
    s = kd.Student(token=TOKEN)
    with pytest.raises(kd.KdserveError, match="is not host:port"):
        s.register_teacher(in_address=address)


@pytest.mark.parametrize("window_bytes", [0, 1 << 20])
def test_slow_student_bounds_what_the_teacher_produces(serve, window_bytes):
    calls: list[int] = []

    def counted(feed: dict[str, Any]) -> dict[str, Any]:
        calls.append(len(feed["x"]))
        return program_a(feed)

    buf, size = 2, 4  # 50 reader batches
    config = {"sample_generator": samples(), "batch_size": size}
    a = serve(counted, A["schema"], config, buf_size=buf, window_bytes=window_bytes)
    s = student([("A", a)], buf_size=1)
    batches = s.get_knowledge_generator(size)()

    def slow() -> list[int]:
        ahead = []
        for i, _ in enumerate(batches):
            time.sleep(0.02)  # give the teacher time to run ahead, as far as it may
            ahead.append(len(calls) - (i + 1))
        return ahead

    ahead = in_thread(slow)
    assert len(ahead) == len(calls) == N // size  # every batch, computed once
    # Computed but not consumed: the replay window (buf) and the teacher's prefetch queue
    # (buf), a batch in each of its two stages, the student's prefetch queues (1 + 1), a
    # batch in its producer and one in the re-batcher. An unbounded teacher would be 49
    # ahead. With a byte floor the window holds every (tiny) batch of the pass instead.
    if window_bytes == 0:
        assert buf <= max(ahead) <= 2 * buf + 6, ahead
    else:
        assert max(ahead) > 2 * buf + 6, ahead
    assert a.wait() == N


def test_a_failing_program_reaches_the_student_as_a_clear_error(serve):
    def flaky(feed: dict[str, Any]) -> dict[str, Any]:
        if int(np.asarray(feed["sample_id"])[0]) >= 5 * TB:
            raise ValueError("the teacher's model broke")
        return program_a(feed)

    service = served(serve, A | {"program": flaky}, buf_size=2)
    s = student([("flaky", service)], connect_timeout=60.0)
    started = time.monotonic()
    with pytest.raises(kd.TeacherUnavailableError, match=r"knowledge service failed.*model broke"):
        in_thread(lambda: read_one(s))
    # the waiting student is told at once, not after retrying for connect_timeout
    assert time.monotonic() - started < 10
    with pytest.raises(ValueError, match="model broke"):
        service.wait()


def _stuck_after(batches: int, release: threading.Event) -> Callable[[dict[str, Any]], Any]:
    """program_a, hanging (until ``release``) from its ``batches + 1``-th batch on: a
    teacher that is alive and answers, but whose program is stuck."""

    def stuck(feed: dict[str, Any]) -> dict[str, Any]:
        if int(np.asarray(feed["sample_id"])[0]) >= batches * TB:
            release.wait(60)
        return program_a(feed)

    return stuck


def test_a_stuck_teacher_is_warned_about_then_given_up_on(serve, caplog, monkeypatch):
    monkeypatch.setattr("kdserve.online.patience._WARN_EVERY", 0.5)
    release = threading.Event()
    service = served(serve, A | {"program": _stuck_after(3, release)}, buf_size=2)
    s = student([("stuck", service)], stall_timeout=2.0)
    caplog.set_level(logging.WARNING, logger="kdserve")
    got: list[dict[str, Any]] = []

    def read() -> None:
        for batch in s.get_knowledge_generator(batch_size=TB)():
            got.append(batch)

    try:
        started = time.monotonic()
        with pytest.raises(kd.TeacherUnavailableError, match=r"'stuck' sent no knowledge for 2 s"):
            in_thread(read)
        assert time.monotonic() - started < 10  # the stall timeout, not a join or connect_timeout
        assert len(got) == 3  # every batch it sent, then the error
        assert "waiting for teacher stuck: no knowledge for" in caplog.text
        started = time.monotonic()
        s.close()
        assert time.monotonic() - started < 5  # no thread was left blocked on the stream
    finally:
        release.set()  # the teacher's program, or later tests wait for its threads


def test_closing_a_student_stops_a_pass_waiting_on_a_stuck_teacher(serve):
    release = threading.Event()
    service = served(serve, A | {"program": _stuck_after(2, release)}, buf_size=2)
    s = student([("stuck", service)], stall_timeout=None)  # it would wait forever
    loop = Background(lambda: list(s.get_knowledge_generator(batch_size=TB)()))
    try:
        time.sleep(1.0)  # the loop has its 2 batches and waits for the third
        started = time.monotonic()
        in_thread(s.close)
        # Told, not ended as if the pass were over: by the pass (closed) or by its
        # reading thread (its stream cancelled), whichever notices first.
        told = "closed before the end of its stream|was cancelled: the student stopped"
        with pytest.raises(kd.KdserveError, match=told):
            loop.result(JOIN)
        assert time.monotonic() - started < 5
    finally:
        release.set()  # the teacher's program, or later tests wait for its threads


def test_a_second_pass_while_one_is_read_is_refused_and_the_first_goes_on(serve):
    service = served(serve, A, times=2)
    s = student([("a", service)])
    loader = s.loader(batch_size=TB)
    first = iter(loader)
    got = [next(first)]
    with pytest.raises(kd.KdserveError, match="a pass of this student is still being read"):
        next(iter(loader))  # would stall: the teacher streams its passes in order
    got += in_thread(lambda: list(first))
    assert ids_of(got).tolist() == list(range(N))
    assert ids_of(in_thread(lambda: list(loader))).tolist() == list(range(N))  # pass 1
    assert service.wait() == 2 * N


def test_closing_a_student_waiting_for_a_teacher_to_start_its_service_says_so():
    """close() from another thread while the student waits for a teacher that listens but
    serves nothing yet: a kdserve error saying it was closed, not pyarrow's."""
    teacher = kd.Teacher(out_port=0, token=TOKEN, progress=False)
    teacher.start()  # no knowledge service yet: the student's first call retries
    try:
        s = kd.Student(token=TOKEN, connect_timeout=60.0)
        s.register_teacher(in_address=teacher.address, name="later")
        s.start()  # it answers (messages flow before its service starts)
        threading.Timer(1.0, s.close).start()
        started = time.monotonic()
        with pytest.raises(kd.KdserveError, match="closed") as closed:
            in_thread(lambda: list(s.loader(batch_size=TB)))
        assert "pyarrow" not in type(closed.value).__module__
        assert time.monotonic() - started < 10
    finally:
        teacher.close()


def test_a_query_to_a_stuck_teacher_is_given_up_on_and_close_ends_one():
    """A query had no bound: a teacher whose program hangs held it forever, and close()
    from another thread did not end it."""
    release = threading.Event()

    def hanging(feed: dict[str, Any]) -> dict[str, Any]:
        release.wait(60)
        return {"y": feed["x"]}

    x = {"x": np.ones((2, 2), np.float32)}
    with kd.serve(hanging, None, feeds=["x"], token=TOKEN, progress=False) as service:
        try:
            with kd.Student(token=TOKEN, stall_timeout=2.0) as s:
                teacher = s.add_teacher(service.address, name="hung")
                started = time.monotonic()
                with pytest.raises(kd.TeacherUnavailableError, match="'hung' sent no knowledge"):
                    in_thread(lambda: s.query(teacher, x))
                assert time.monotonic() - started < 10
            s = kd.Student(token=TOKEN, stall_timeout=None)  # waits for ever, unless closed
            teacher = s.add_teacher(service.address, name="hung")
            threading.Timer(1.0, s.close).start()
            closed = "query to teacher .hung. was cancelled: the student was closed"
            with pytest.raises(kd.KdserveError, match=closed):
                in_thread(lambda: s.query(teacher, x))
        finally:
            release.set()


def test_queries_and_a_pass_on_one_teacher_do_not_cancel_each_other():
    """Ending one stream (a query's, or a pass's) cancelled every stream of the teacher."""
    x = np.arange(200, dtype=np.float32)[:, None]
    data = [{"x": x[i : i + 4]} for i in range(0, 200, 4)]
    with (
        kd.serve(lambda f: {"y": f["x"] * 2}, data, token=TOKEN, progress=False) as service,
        kd.Student(token=TOKEN) as s,
    ):
        teacher = s.add_teacher(service.address)
        queried = threading.Event()

        def read() -> np.ndarray:  # its stream stays open while the queries run
            batches = iter(s.loader(batch_size=4))
            first = next(batches)
            queried.wait(JOIN)
            return ids_of([first, *batches])

        passed = Background(read)
        answers = [s.query(teacher, {"x": x[i : i + 2]}) for i in range(30)]
        queried.set()
        assert all(np.array_equal(a["y"], x[i : i + 2] * 2) for i, a in enumerate(answers))
        assert passed.result(JOIN).tolist() == list(range(200))
        with pytest.raises(ValueError, match="max_in_flight must be an int >= 1"):
            s.query_stream(teacher, [], max_in_flight=0)


@pytest.mark.parametrize("value", [0, -1, "10", True])
def test_student_timeouts_must_be_positive_seconds(value):
    for name in ("connect_timeout", "stall_timeout"):
        with pytest.raises((TypeError, ValueError), match=name):
            kd.Student(**{name: value})


def test_student_closes_as_a_context_manager(serve):
    service = served(serve, A)
    with student([("a", service)]) as s:
        assert len(ids_of(read_one(s))) == N
    with pytest.raises(kd.KdserveError, match="student is closed"):
        s.get_knowledge_generator(batch_size=8)
    service.wait()


def test_small_ready_batches_travel_coalesced_and_arrive_whole(serve):
    service = serve(program_a, A["schema"], reader(), buf_size=64, times=3)
    s = student([("a", service)])
    client = s._client(0)
    window = service.teacher._server.window
    last = -(-N // TB) - 1

    def produced(pass_: int) -> None:  # every batch of the pass is in the replay window
        wait_for(lambda: window.ready(pass_, last), JOIN, f"all of pass {pass_} produced")

    # Pass 0 starts production; the window holds every pass (64 batches), so passes 1
    # and 2 are produced ahead while nobody reads them: their batches are all ready.
    assert len(list(client.stream_pass(0, 0, 1, ack_every=4))) == last + 1
    produced(1)
    ticket = flight.Ticket(Ticket(1, 0, 0, 1).to_bytes())
    chunks = list(client._client.do_get(ticket, client._options()))
    assert len(chunks) < last + 1  # fewer messages than batches: small ones were joined
    ids = np.concatenate([c.data.column(0).to_numpy() for c in chunks])
    np.testing.assert_array_equal(ids, np.arange(N))  # ... and nothing lost or repeated
    # The student cuts them back into the teacher's batches (every one, in order).
    produced(2)
    batches = list(client.stream_pass(2, 0, 1, ack_every=4))
    assert [b.num_rows for b in batches] == [TB] * (N // TB) + [N % TB]
    np.testing.assert_array_equal(np.concatenate([b.column(0) for b in batches]), np.arange(N))
    s.close()
    service.teacher.close()


def test_a_user_dict_shaped_like_an_encoded_array_is_refused_at_send():
    with pytest.raises(TypeError, match="reserved for numpy arrays"):
        encode_message({"batch": [{"__ndarray__": {"dtype": "<f4"}}]})
    # Another key beside it makes it an ordinary dict, which round-trips.
    ordinary = {"__ndarray__": 1, "other": 2}
    assert decode_message(encode_message(ordinary)) == ordinary
