"""Offline mode end to end: teachers dump to stores, students merge and read them."""

import threading

import numpy as np
import pytest

import kdserve as kd
from kdserve.core.sampler import Sampler

N = 500
X = np.random.default_rng(0).normal(size=(N, 6)).astype(np.float32)
LABELS = np.arange(N) % 7
W = {k: np.random.default_rng(k).normal(size=(6, 5)).astype(np.float32) for k in (1, 2, 3)}


def _samples(order=None):
    def gen():
        for i in range(N) if order is None else order:
            yield X[i], LABELS[i], i

    return gen


def _dump(path, k, order=None, **kwargs):
    with kd.Teacher(path, progress=False, shard_bytes=4096) as teacher:
        written = teacher.start_knowledge_service(
            feed_list=["x", "label", "sample_id"],
            schema=["logits", "label"],
            program=lambda feed: {"logits": feed["x"] @ W[k]},
            reader_config={"sample_generator": _samples(order), "batch_size": 32},
            **kwargs,
        )
    return written


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    _dump(root / "a", 1)
    _dump(root / "b", 2, use_fp16=True)
    _dump(root / "c", 3, order=list(reversed(range(N))))  # same samples, other order
    return root


def _student(stores, names=("a", "b"), **kwargs):
    student = kd.Student(merge_strategy={"logits": "mean", "label": kd.Take(0)}, **kwargs)
    for n in names:
        student.register_teacher(in_path=stores / n)
    student.start()
    return student


def _exact(ids, teachers):
    return np.mean([X[ids] @ W[k] for k in teachers], axis=0)


def test_two_offline_teachers_merge_by_sample_id(stores):
    student = _student(stores)
    assert student.get_knowledge_desc() == {
        "logits": {"shape": [-1, 5], "dtype": "float32", "lod_level": 0},
        "label": {"shape": [-1], "dtype": "int64", "lod_level": 0},
    }
    batches = list(student.get_knowledge_generator(batch_size=64)())
    assert [len(b["sample_id"]) for b in batches] == [64] * 7 + [52]
    ids = np.concatenate([b["sample_id"] for b in batches])
    np.testing.assert_array_equal(ids, np.arange(N))
    logits = np.concatenate([b["logits"] for b in batches])
    np.testing.assert_allclose(logits, _exact(ids, (1, 2)), atol=2e-2)  # b is fp16
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), LABELS)


def test_teachers_in_different_orders_are_aligned_by_id(stores):
    student = _student(stores, ("a", "c"))
    for batch in student.get_knowledge_generator(batch_size=50, drop_last=True)():
        np.testing.assert_allclose(batch["logits"], _exact(batch["sample_id"], (1, 3)), rtol=1e-5)


def test_each_call_is_one_more_pass_with_a_new_shuffle(stores):
    student = _student(stores, shuffle=True, seed=5, block_rows=64)
    reader = student.get_knowledge_generator(batch_size=100)
    passes = [np.concatenate([b["sample_id"] for b in reader()]) for _ in range(3)]
    for ids in passes:
        assert sorted(ids.tolist()) == list(range(N))
    assert not np.array_equal(passes[0], passes[1])
    again = _student(stores, shuffle=True, seed=5, block_rows=64).get_knowledge_generator(100)
    np.testing.assert_array_equal(np.concatenate([b["sample_id"] for b in again()]), passes[0])


def test_data_parallel_ranks_get_disjoint_shares(stores):
    shares = []
    for rank in range(3):
        student = _student(stores, rank=rank, world_size=3, shuffle=True, even_ranks="none")
        ids = np.concatenate([b["sample_id"] for b in student.get_knowledge_generator(16)()])
        assert len(ids) == len(student)
        shares.append(ids)
    assert sorted(np.concatenate(shares).tolist()) == list(range(N))


def test_stopping_early_stops_the_prefetch_thread(stores):
    student = _student(stores, buf_size=2)
    before = threading.active_count()
    for i, _ in enumerate(student.get_knowledge_generator(batch_size=8)()):
        if i == 3:
            assert student.get_knowledge_qsize() <= 2
            break
    assert threading.active_count() <= before


def test_misaligned_teachers_are_refused(stores, tmp_path):
    with kd.Teacher(tmp_path / "short", progress=False) as t:
        t.dump({"logits": np.zeros((10, 5), np.float32), "label": np.zeros(10, np.int64)})
    student = kd.Student(merge_strategy={"logits": "mean", "label": "max"})
    student.register_teacher(in_path=stores / "a")
    student.register_teacher(in_path=tmp_path / "short")
    with pytest.raises(kd.AlignmentError, match=r"do not hold the same samples.*first id only in"):
        student.start()


def test_shared_field_without_strategy_is_refused(stores):
    student = kd.Student()
    student.register_teacher(in_path=stores / "a")
    student.register_teacher(in_path=stores / "b")
    with pytest.raises(kd.MergeError, match="field 'logits' comes from teachers"):
        student.start()


def test_student_usage_errors(stores):
    student = kd.Student()
    with pytest.raises(kd.KdserveError, match="register at least one teacher"):
        student.start()
    with pytest.raises(kd.KdserveError, match="needs exactly one of in_path="):
        student.register_teacher()
    with pytest.raises(kd.KdserveError, match="register at least one teacher"):
        student.get_knowledge_desc()  # any use starts the student
    student.register_teacher(in_path=stores / "nope")
    with pytest.raises(kd.StoreError, match="does not exist"):
        student.start()
    offline = _student(stores)
    with pytest.raises(kd.KdserveError, match="no online teacher to send to"):
        offline.send({"step": 1})  # stores take no messages: said, not silently dropped
    with pytest.raises(kd.KdserveError, match="is offline"):
        offline.send({"step": 1}, teacher_ids=[0])


def test_dump_api_declared_schema_and_resume(tmp_path):
    path = tmp_path / "dumped"
    schema = kd.Schema(
        [kd.Field("emb", "float32", (3,), codec="bf16"), kd.Field("seq", "int32", (None,))]
    )
    seqs = [np.arange(i % 4, dtype=np.int32) for i in range(10)]
    with kd.Teacher(path, progress=False, name="embedder", model="toy v1") as t:
        t.start_knowledge_service(["emb", "seq"], schema, lambda f: {}, [(np.ones((10, 3)), seqs)])
    reader = kd.StoreReader(path)
    assert reader.teacher == {
        "name": "embedder",
        "model": "toy v1",
        "kdserve_version": kd.__version__,
    }
    assert reader.schema["emb"].codec == kd.Bf16() and len(reader) == 10
    back = kd.from_record_batch(reader.read(0, 10))
    assert [len(s) for s in back["seq"]] == [i % 4 for i in range(10)]

    # dump(): a re-run over the stored rows skips them and appends only what is new.
    with kd.Teacher(tmp_path / "d", progress=False) as t:
        t.dump({"y": np.arange(4.0)})
        t.dump({"y": np.arange(4.0, 8.0)})
    with kd.Teacher(tmp_path / "d", progress=False) as t:
        for start in (0, 4, 8):
            t.dump({"y": np.arange(start, start + 4.0)})
    reader = kd.StoreReader(tmp_path / "d")
    np.testing.assert_array_equal(reader.sample_ids(), np.arange(12))
    np.testing.assert_array_equal(kd.from_record_batch(reader.read(0, 12))["y"], np.arange(12.0))


def test_teacher_usage_errors(tmp_path):
    teacher = kd.Teacher(tmp_path / "t", progress=False)
    with pytest.raises(kd.KdserveError, match="call start"):
        teacher.dump({"y": np.ones(2)})
    teacher.start()
    with pytest.raises(ValueError, match="times > 1 is for online service"):
        teacher.start_knowledge_service(["x"], ["y"], lambda f: f, [(np.ones(2),)], times=2)
    with pytest.raises(kd.SchemaError, match="neither a program output"):
        teacher.start_knowledge_service(["x"], ["y"], lambda f: {"z": f["x"]}, [(np.ones(2),)])
    with pytest.raises(kd.SchemaError, match="must return a dict"):
        teacher.start_knowledge_service(["x"], ["y"], lambda f: f["x"], [(np.ones(2),)])
    teacher.close()
    with pytest.raises(kd.KdserveError, match="is closed"):
        teacher.dump({"y": np.ones(2)})


def _data(n: int = 4) -> list[dict[str, np.ndarray]]:
    x = np.arange(n * 2 * 3, dtype=np.float32).reshape(n * 2, 3)
    return [{"x": x[i : i + 2]} for i in range(0, n * 2, 2)]


@pytest.mark.parametrize(
    ("program", "says"),
    [
        # an output first returned by a later batch would be dropped from every batch
        (
            lambda f: {"a": f["x"], **({"b": f["x"]} if f["x"][0, 0] > 5 else {})},
            r"returned output\(s\) \['b'\] that its first batch did not",
        ),
        # float64 beyond float32 (which the first batch fixed) would become inf
        (
            lambda f: {"a": f["x"] if f["x"][0, 0] < 5 else f["x"].astype(np.float64) * 1e300},
            r"field 'a' is float32, got float64 values beyond its range .* become inf",
        ),
        # integers a float32 field cannot hold (beyond 2**24) would be other numbers
        (
            lambda f: {"a": f["x"] if f["x"][0, 0] < 5 else f["x"].astype(np.int64) + 2**25},
            r"got int64 values it cannot hold exactly \(e\.g\. 33554438 would be stored as",
        ),
        # kdserve's own id column: the ids come from the reader
        (lambda f: {"a": f["x"], "sample_id": np.array([7, 7])}, "output named 'sample_id'"),
        (lambda f: {3: f["x"]}, "output names must be non-empty strings, got 3"),
    ],
    ids=["late-output", "float-overflow", "inexact-int", "sample-id", "int-name"],
)
def test_a_program_output_that_would_be_dropped_or_changed_is_refused(tmp_path, program, says):
    with pytest.raises(kd.SchemaError, match=says):
        kd.dump(program, _data(), tmp_path / "t", progress=False)
    store = tmp_path / "t"  # nothing was passed off as done
    assert not (store / "manifest.json").exists() or not kd.StoreReader(store).complete


def test_a_program_passing_the_sample_ids_through_is_accepted(tmp_path):
    data = [
        {"x": b["x"], "sample_id": np.arange(i * 2, i * 2 + 2) + 100} for i, b in enumerate(_data())
    ]
    echo = lambda f: {"y": f["x"], "sample_id": f["sample_id"].astype(np.int32)}  # noqa: E731
    assert kd.dump(echo, data, tmp_path / "t", progress=False) == 8
    assert kd.StoreReader(tmp_path / "t").sample_ids().tolist() == list(range(100, 108))


def test_an_empty_out_path_is_refused_rather_than_writing_into_the_working_directory(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    for path in ("", "  "):
        with pytest.raises(kd.KdserveError, match="out_path is empty"):
            kd.dump(lambda f: {"a": f["x"]}, _data(), path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_store_partitions_over_ranks_and_workers_cover_every_row_once(stores):
    reader = kd.StoreReader(stores / "a")
    seen = []
    for rank in range(2):
        for worker in range(3):
            sampler = Sampler(True, 11, 50, rank, 2, worker, 3)
            for batch in reader.iter_blocks(sampler.plan(len(reader), epoch=4)):
                seen.append(batch.column(0).to_numpy())
    assert sorted(np.concatenate(seen).tolist()) == list(range(N))


def test_take_gathers_scattered_rows_in_the_asked_order(stores):
    reader = kd.StoreReader(stores / "c")  # stored in reverse order: row r holds id N-1-r
    rows = np.random.default_rng(3).permutation(N)[:123]
    batch = kd.from_record_batch(reader.take(rows))
    np.testing.assert_array_equal(batch["sample_id"], N - 1 - rows)
    np.testing.assert_allclose(batch["logits"], X[N - 1 - rows] @ W[3], rtol=1e-6)


def test_bad_arguments_get_errors_that_name_them(tmp_path):
    data = [{"x": np.ones((2, 2), np.float32)}]
    with pytest.raises(TypeError, match=r"program must be callable .* got int"):
        kd.dump(5, data, tmp_path / "a", progress=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="program must be callable"):
        kd.serve(5, data)  # type: ignore[arg-type]
    for times in (0, -1, 1.5):
        with pytest.raises(ValueError, match="times must be an int >= 1"):
            kd.serve(lambda f: {"y": f["x"]}, data, times=times)  # type: ignore[arg-type]
    long_double = lambda f: {"y": f["x"].astype(np.longdouble)}  # noqa: E731
    if np.dtype(np.longdouble).itemsize > 8:  # float128 where the platform has it
        with pytest.raises(kd.SchemaError, match="at most 64 bits"):
            kd.dump(long_double, data, tmp_path / "b", progress=False)
    with pytest.raises(kd.SchemaError, match="shape must be a tuple of dimensions"):
        kd.Field("y", "float32", 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="merge_strategy maps each field"):
        kd.Student(merge_strategy="mean")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed must be an int, got 'x'"):
        kd.Student(seed="x")  # type: ignore[arg-type]
    for port in (-1, 70000, "abc"):
        teacher = kd.Teacher(out_port=port, progress=False)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"out_port must be an int in 0\.\.65535"):
            teacher.start()
        teacher.close()


def test_nan_knowledge_is_warned_about_once_per_field_and_inf_is_not(tmp_path, caplog):
    """-inf is ordinary in logits (masked tokens); NaN means a broken teacher."""

    def program(f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        masked = f["x"].copy()
        masked[:, 0] = -np.inf
        broken = f["x"].copy()
        if f["x"][0, 0] in (6, 12):  # the batches of sample ids 2..3 and 4..5
            broken[0, 1] = np.nan
        rows = [row[: 2 + i] for i, row in enumerate(broken)]  # sequences: a list of arrays
        return {"masked": masked, "broken": broken, "seq": rows}

    caplog.set_level("WARNING", logger="kdserve")
    assert kd.dump(program, _data(4), tmp_path / "t", progress=False) == 8
    warnings = [r.getMessage() for r in caplog.records if "holds NaN" in r.getMessage()]
    assert len(warnings) == 2, warnings  # once per field, not once per batch
    assert {w.split("'")[1] for w in warnings} == {"broken", "seq"}
    assert all("sample ids 2..3" in w or "sample ids 4..5" in w for w in warnings)
    stored = kd.from_record_batch(kd.StoreReader(tmp_path / "t").read(0, 8))
    assert np.isneginf(stored["masked"][:, 0]).all()  # kept as it is
