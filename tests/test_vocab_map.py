"""Vocabulary maps (issue #11): ``kd.VocabMap`` is validated entry by entry; registered
with a store or an online teacher it rewrites that teacher's top-k indices into the
student's token ids -- compact, decoded (over the student's vocabulary), in passes and
queries, for fixed and sequence fields -- and lifts the mixed-vocabulary refusal for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kdserve as kd

VT, VS, K = 6, 8, 3  # the teacher's vocabulary, the student's, top-k
N, B = 40, 8
IDS = np.array([5, 0, 7, 2, 6, 1])  # teacher token t is the student's IDS[t]; 3 and 4 unused
X = np.random.default_rng(0).standard_normal((N, VT)).astype(np.float32)
TOPK = kd.Schema([kd.Field("logits", "float32", (VT,), codec=kd.TopK(K))])
THEIRS = {"tokenizer": "bpe-6", "vocab_size": VT}
OURS = {"tokenizer": "bpe-8", "vocab_size": VS}


def batches(x: np.ndarray = X) -> list[dict[str, np.ndarray]]:
    return [{"x": x[i : i + B]} for i in range(0, len(x), B)]


def program(feed: dict[str, Any]) -> dict[str, np.ndarray]:
    return {"logits": 3 * np.asarray(feed["x"])}


def read(loader: kd.Loader) -> dict[str, Any]:
    got = list(loader)
    first = got[0]["logits"]
    if isinstance(first, dict):
        return {c: np.concatenate([b["logits"][c] for b in got]) for c in first}
    return {"dense": np.concatenate([b["logits"] for b in got])}


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    kd.dump(program, batches(), tmp_path / "t", keep=TOPK, provenance=THEIRS, progress=False)
    return tmp_path / "t"


def compact(path: Path, vocab_map: kd.VocabMap | None = None) -> dict[str, Any]:
    with kd.Student() as student:
        student.add_store(path, vocab_map=vocab_map)
        return read(student.loader(batch_size=16, decode=False))


# -- the map itself --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "vocab_size", "error", "reason"),
    [
        (IDS.astype(np.float32), VS, TypeError, "must be integer token ids, got dtype float32"),
        (IDS > 2, VS, TypeError, "got dtype bool"),
        (IDS.reshape(2, 3), VS, ValueError, r"non-empty 1-D array.*got shape \(2, 3\)"),
        (np.array([], np.int64), VS, ValueError, r"got shape \(0,\)"),
        (IDS, 7, ValueError, r"maps teacher token 2 to 7, outside the student's .*\[0, 7\)"),
        (np.array([0, -1, 2]), VS, ValueError, r"teacher token 1 to -1, outside"),
        (
            np.array([4, 1, 4, 1]),
            VS,
            ValueError,
            r"teacher tokens 1 and 3 both to student token 1 \(2 repeated",
        ),
        (IDS, 0, ValueError, "vocab_size must be >= 1, got 0"),
        (IDS, True, TypeError, "vocab_size must be an int, got True"),
        (IDS, 8.0, TypeError, "vocab_size must be an int, got 8.0"),
    ],
    ids=[
        "float",
        "bool",
        "2-D",
        "empty",
        "too-big",
        "negative",
        "repeated",
        "size-0",
        "size-bool",
        "size-float",
    ],
)
def test_a_bad_map_is_refused_naming_the_entry(ids, vocab_size, error, reason):
    with pytest.raises(error, match=reason):
        kd.VocabMap(ids, vocab_size)


def test_a_map_is_a_value():
    vmap = kd.VocabMap(IDS.astype(np.uint8), vocab_size=VS)
    assert len(vmap) == VT and vmap.vocab_size == VS
    assert vmap == kd.VocabMap(list(IDS), VS) and vmap != kd.VocabMap(IDS, VS + 1)
    assert repr(vmap) == "VocabMap(<6 teacher tokens>, vocab_size=8)"
    assert vmap.ids.dtype == np.int64 and not vmap.ids.flags.writeable


def test_a_plain_array_is_refused_with_the_type_to_use(store):
    with kd.Student() as student, pytest.raises(TypeError, match=r"kd\.VocabMap\(ids, vocab"):
        student.add_store(store, vocab_map=IDS)  # type: ignore[arg-type]


# -- stores ----------------------------------------------------------------------------


def test_compact_indices_become_the_students(store):
    plain = compact(store)
    mapped = compact(store, kd.VocabMap(IDS, VS))
    assert plain["indices"].shape == mapped["indices"].shape == (N, K)
    np.testing.assert_array_equal(mapped["indices"], IDS[plain["indices"]])
    np.testing.assert_array_equal(mapped["values"], plain["values"])
    np.testing.assert_array_equal(mapped["tail"], plain["tail"])
    # the indices' dtype is that of a top-k field over the student's vocabulary
    student_field = kd.Field("logits", "float32", (VS,), codec=kd.TopK(K))
    assert mapped["indices"].dtype == student_field.layout()["indices"][0]


def test_decoding_spreads_over_the_students_vocabulary_keeping_the_top_k_exact(store):
    with kd.Student() as student:
        student.add_store(store, vocab_map=kd.VocabMap(IDS, VS))
        assert student.get_knowledge_desc()["logits"]["shape"] == [-1, VS]
        dense = read(student.loader(batch_size=16))["dense"]
    assert dense.shape == (N, VS)
    teacher = 3 * X.astype(np.float64)
    top = np.argsort(-teacher, axis=1)[:, :K]
    # the top-k logits sit at the student's ids of the teacher's tokens ...
    np.testing.assert_allclose(
        np.take_along_axis(dense, IDS[top], 1), np.take_along_axis(teacher, top, 1), rtol=1e-6
    )
    # ... with the teacher's exact probabilities; the tail is spread over the other VS - K
    p_student, p_teacher = softmax(dense.astype(np.float64)), softmax(teacher)
    np.testing.assert_allclose(
        np.take_along_axis(p_student, IDS[top], 1),
        np.take_along_axis(p_teacher, top, 1),
        rtol=1e-5,
    )
    rest = np.ones_like(dense, dtype=bool)
    np.put_along_axis(rest, IDS[top], False, 1)
    assert np.allclose(dense[rest].reshape(N, VS - K), dense[rest].reshape(N, VS - K)[:, :1])


def test_a_map_lifts_the_mixed_vocabulary_refusal_for_its_teacher(tmp_path, store):
    wide = np.random.default_rng(1).standard_normal((N, VS)).astype(np.float32)
    ours = kd.Schema([kd.Field("logits", "float32", (VS,), codec=kd.TopK(K))])
    kd.dump(program, batches(wide), tmp_path / "s", keep=ours, provenance=OURS, progress=False)
    strategy = {"logits": kd.Take("t")}
    with kd.Student(merge_strategy=strategy) as student:
        student.add_store(tmp_path / "s")
        student.add_store(store, name="t")
        with pytest.raises(kd.MergeError, match=r"different vocab_sizes.*vocab_map=kd\.VocabMap"):
            student.start()
    with kd.Student(merge_strategy=strategy, expect={"vocab_size": VS}) as student:
        student.add_store(tmp_path / "s")
        student.add_store(store, name="t", vocab_map=kd.VocabMap(IDS, VS))
        merged = read(student.loader(batch_size=16))["dense"]
        desc = student.get_teacher_desc()
    assert merged.shape == (N, VS)
    mapped_only = kd.Student()
    mapped_only.add_store(store, vocab_map=kd.VocabMap(IDS, VS))
    np.testing.assert_array_equal(merged, read(mapped_only.loader(batch_size=16))["dense"])
    mapped_only.close()
    assert desc["t"]["vocab_map"] == {"teacher_vocab": VT, "vocab_size": VS}
    assert desc["t"]["fields"]["logits"]["shape"] == [-1, VT]  # as the teacher records it


def test_expect_compares_a_mapped_teachers_vocab_size_with_the_maps(store):
    with kd.Student(expect={"vocab_size": VS + 1}) as student:
        student.add_store(store, vocab_map=kd.VocabMap(IDS, VS))
        with pytest.raises(
            kd.StoreError,
            match=r"provenance \{'vocab_size': 8\} \(with its vocab_map: vocab_size the map's, "
            r"tokenizer not compared\) where the student expects \{'vocab_size': 9\}",
        ):
            student.start()
    with kd.Student(expect={"vocab_size": VS, "tokenizer": "bpe-8"}) as student:
        student.add_store(store, vocab_map=kd.VocabMap(IDS, VS))
        with pytest.raises(kd.StoreError, match=r"\{'tokenizer': None\} \(with its vocab_map"):
            student.start()


@pytest.mark.parametrize(
    ("keep", "vmap", "reason"),
    [
        (TOPK, kd.VocabMap(IDS[:5], VS), r"'logits' is top-3 over 6 entries, but its vocab_map"),
        (
            kd.Schema([kd.Field("logits", "float32", (VT,), codec="fp16")]),
            kd.VocabMap(IDS, VS),
            r"'logits' has 6 entries per row, as many as its vocabulary, but is not TopK",
        ),
        (
            kd.Schema([kd.Field("logits", "float32", (VT,), codec="fp16")]),
            kd.VocabMap(IDS[:4], VS),
            r"no TopK field for its vocab_map to rewrite \(fields \['logits'\]\)",
        ),
    ],
    ids=["wrong-length", "dense-vocab-field", "no-topk"],
)
def test_a_map_that_does_not_fit_the_teacher_is_refused_at_start(tmp_path, keep, vmap, reason):
    kd.dump(program, batches(), tmp_path / "t", keep=keep, progress=False)
    with kd.Student() as student:
        student.add_store(tmp_path / "t", vocab_map=vmap)
        with pytest.raises(kd.SchemaError, match=reason) as refused:
            student.start()
    assert refused.value.field == "logits" or "no TopK" in str(refused.value)


def test_sequence_fields_are_mapped_step_by_step(tmp_path):
    lengths = [3, 1, 4, 2, 5, 1]
    rng = np.random.default_rng(2)
    seqs = [rng.standard_normal((n, VT)).astype(np.float32) for n in lengths]
    data = [{"i": np.arange(i, i + 2)} for i in range(0, len(seqs), 2)]
    keep = kd.Schema([kd.Field("logits", "float32", (None, VT), codec=kd.TopK(K))])

    def lm(feed: dict[str, Any]) -> dict[str, Any]:
        return {"logits": [seqs[i] for i in feed["i"]]}

    kd.dump(lm, data, tmp_path / "lm", keep=keep, progress=False)
    got: dict[str, list[Any]] = {"plain": [], "mapped": [], "dense": []}
    for key, vmap, decode in [
        ("plain", None, False),
        ("mapped", kd.VocabMap(IDS, VS), False),
        ("dense", kd.VocabMap(IDS, VS), True),
    ]:
        with kd.Student() as student:
            student.add_store(tmp_path / "lm", vocab_map=vmap)
            for batch in student.loader(batch_size=4, decode=decode):
                got[key].extend(batch["logits"]["indices"] if not decode else batch["logits"])
    assert [len(s) for s in got["mapped"]] == lengths
    for plain, mapped, dense, seq in zip(
        got["plain"], got["mapped"], got["dense"], seqs, strict=True
    ):
        np.testing.assert_array_equal(mapped, IDS[plain])
        assert dense.shape == (len(seq), VS)
        top = np.argsort(-seq, axis=1)[:, :K]
        np.testing.assert_array_equal(
            np.take_along_axis(dense, IDS[top], 1), np.take_along_axis(seq, top, 1)
        )


# -- online teachers -------------------------------------------------------------------


def test_an_online_teachers_stream_and_queries_are_mapped(store):
    plain = compact(store)
    with kd.serve(program, batches(), keep=TOPK, provenance=THEIRS, progress=False) as service:
        student = kd.Student(connect_timeout=10.0, expect={"vocab_size": VS})
        student.add_teacher(service.address, vocab_map=kd.VocabMap(IDS, VS))
        mapped = read(student.loader(batch_size=16, decode=False))
        student.close()
    np.testing.assert_array_equal(mapped["indices"], IDS[plain["indices"]])
    np.testing.assert_array_equal(mapped["values"], plain["values"])

    with kd.serve(program, None, feeds=["x"], keep=TOPK, provenance=THEIRS) as service:
        student = kd.Student(connect_timeout=10.0)
        student.add_teacher(service.address, vocab_map=kd.VocabMap(IDS, VS))
        out = student.query(0, {"x": X[:5]}, decode=False)["logits"]
        dense = student.query(0, {"x": X[:5]})["logits"]
        student.close()
    np.testing.assert_array_equal(out["indices"], IDS[plain["indices"][:5]])
    assert dense.shape == (5, VS)
    np.testing.assert_array_equal(
        np.take_along_axis(dense, out["indices"].astype(np.intp), 1), out["values"]
    )


def test_an_online_teacher_of_another_vocabulary_is_refused_beside_a_store(tmp_path, store):
    wide = np.random.default_rng(1).standard_normal((N, VS)).astype(np.float32)
    ours = kd.Schema([kd.Field("logits", "float32", (VS,), codec=kd.TopK(K))])
    with kd.serve(program, batches(wide), keep=ours, provenance=OURS, progress=False) as service:
        student = kd.Student(connect_timeout=10.0, merge_strategy={"logits": kd.Take(0)})
        student.add_teacher(service.address)
        student.add_store(store)
        with pytest.raises(kd.MergeError, match=r"different tokenizers|different vocab_sizes"):
            student.get_knowledge_desc()
        student.close()
        student = kd.Student(connect_timeout=10.0, merge_strategy={"logits": kd.Take(0)})
        student.add_teacher(service.address)
        student.add_store(store, vocab_map=kd.VocabMap(IDS, VS))
        merged = read(student.loader(batch_size=16))["dense"]
        student.close()
    assert merged.shape == (N, VS)
    np.testing.assert_allclose(
        np.sort(merged, axis=1)[:, -K:], np.sort(3 * wide, axis=1)[:, -K:], rtol=1e-6
    )


def test_a_mapped_teacher_reads_as_that_teacher_written_in_the_students_vocabulary(tmp_path):
    """Mapping T is the same as T dumped over the student's vocabulary (its logits at the
    student's ids, the student's other tokens out of reach): compact, decoded, and in a
    compact mean with a teacher of the student's vocabulary."""
    native = np.full((N, VS), -1e4, np.float32)
    native[:, IDS] = X
    ours = kd.Schema([kd.Field("logits", "float32", (VS,), codec=kd.TopK(K))])
    kd.dump(program, batches(), tmp_path / "t", keep=TOPK, progress=False)
    kd.dump(program, batches(native), tmp_path / "native", keep=ours, progress=False)
    wide = np.random.default_rng(3).standard_normal((N, VS)).astype(np.float32)
    kd.dump(program, batches(wide), tmp_path / "s", keep=ours, progress=False)

    def pass_of(path: Path, vmap: kd.VocabMap | None, decode: bool, mean: bool) -> Any:
        with kd.Student(merge_strategy={"logits": "mean"} if mean else None) as student:
            if mean:
                student.add_store(tmp_path / "s")
            student.add_store(path, name="t", vocab_map=vmap)
            return read(student.loader(batch_size=16, decode=decode))

    vmap = kd.VocabMap(IDS, VS)
    for decode, mean in [(False, False), (True, False), (False, True), (True, True)]:
        mapped = pass_of(tmp_path / "t", vmap, decode, mean)
        same = pass_of(tmp_path / "native", None, decode, mean)
        assert mapped.keys() == same.keys()
        for part in mapped:
            assert mapped[part].dtype == same[part].dtype, (decode, mean, part)
            if part == "indices":
                np.testing.assert_array_equal(mapped[part], same[part])
            else:
                np.testing.assert_allclose(mapped[part], same[part], rtol=1e-5, atol=1e-6)


def test_knowledge_dataset_takes_maps_and_expect_per_teacher(store: Path) -> None:
    import torch
    from torch.utils.data import DataLoader

    from kdserve.torch import KnowledgeDataset

    mapped = KnowledgeDataset(
        [store], batch_size=16, decode=False, vocab_maps={store: kd.VocabMap(IDS, VS)}
    )
    got = torch.cat([b["logits_indices"].long() for b in DataLoader(mapped, batch_size=None)])
    np.testing.assert_array_equal(got.numpy(), IDS[compact(store)["indices"].astype(int)])
    wrong = KnowledgeDataset([store], batch_size=16, expect={"tokenizer": "bpe-8"})
    with pytest.raises(kd.StoreError, match="tokenizer"):
        list(DataLoader(wrong, batch_size=None))
    with pytest.raises(ValueError, match="not among the teachers"):
        KnowledgeDataset([store], batch_size=16, vocab_maps={"elsewhere": kd.VocabMap(IDS, VS)})
