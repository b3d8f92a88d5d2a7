"""Mean of top-k teachers is the mixture of their distributions (issue #11): compact
(decode=False) merges against the dense computation -- decode each teacher, mix the
probability vectors with the weights, take the top k and the tail -- and through real stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kdserve as kd
from kdserve.core.merge import Merger

SID = kd.SAMPLE_ID
FAST = settings(max_examples=150, deadline=None)
ATOL = 1e-6


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def distribution(codec: kd.TopK, width: int, parts: dict[str, np.ndarray]) -> np.ndarray:
    """A teacher's distribution over all classes: TopK.decode, then softmax for logits."""
    decoded = codec.decode(parts, np.dtype(np.float64), (width,))
    return softmax(decoded) if codec.kind == "logits" else decoded


def dense_mixture(codec, width, parts, weights) -> np.ndarray:
    total = sum(weights)
    return sum(
        w / total * distribution(codec, width, p) for w, p in zip(weights, parts, strict=True)
    )


def assert_top_k_of(q: np.ndarray, compact: dict[str, np.ndarray], codec: kd.TopK) -> None:
    """``compact`` holds k most probable classes of ``q``, their probabilities (descending)
    and the rest's mass: compared by value, so that ties may pick other classes."""
    k = codec.k
    prob = compact["values"].astype(np.float64)
    prob = np.exp(prob) if codec.kind == "logits" else prob
    classes = compact["indices"].astype(np.int64)
    ordered = np.sort(classes, axis=-1)
    assert (ordered[..., 1:] != ordered[..., :-1]).all()  # k distinct classes
    np.testing.assert_allclose(np.take_along_axis(q, classes, -1), prob, rtol=0, atol=ATOL)
    best = -np.sort(-q, axis=-1)[..., :k]
    np.testing.assert_allclose(prob, best, rtol=0, atol=ATOL)  # the k best, descending
    if codec.tail:
        rest = q.sum(axis=-1) - best.sum(axis=-1)
        np.testing.assert_allclose(compact["tail"], rest, rtol=0, atol=ATOL)
        assert compact["tail"].dtype == np.float32
    else:
        assert set(compact) == {"values", "indices"}


def merge_compact(codec, width, parts, strategy, shape=None) -> dict[str, Any]:
    """Merge one batch per teacher (``a``, ``b``, ...; compact or decoded) through a Merger."""
    names = "abcd"[: len(parts)]
    field = kd.Field("logits", "float32", shape or (width,), codec=codec)
    merger = Merger(dict.fromkeys(names, kd.Schema([field])), {"logits": strategy})
    merger.check_compact()
    n = len(parts[0]["values"] if isinstance(parts[0], dict) else parts[0])
    batches = {t: {SID: np.arange(n), "logits": p} for t, p in zip(names, parts, strict=True)}
    return merger.merge(batches)["logits"]


@st.composite
def teachers(draw: st.DrawFn, hand_written: bool = False) -> dict[str, Any]:
    """A TopK codec, 2-3 teachers' compact batches and their weights. Encoded from dense
    rows, whose few distinct values make ties; or ``hand_written`` components, whose
    tails may exceed what the stored classes allow (as a producer's own top-k can)."""
    width = draw(st.integers(1, 9))
    codec = kd.TopK(
        draw(st.integers(1, width)), draw(st.sampled_from(["logits", "probs"])), draw(st.booleans())
    )
    count, n = draw(st.integers(2, 3)), draw(st.integers(0, 4))
    weight = st.one_of(st.just(0.0), st.floats(0.01, 4))
    weights = draw(st.lists(weight, min_size=count, max_size=count).filter(lambda w: sum(w) > 0))
    make = _hand_written if hand_written else _encoded
    parts = [draw(make(codec, width, n)) for _ in range(count)]
    return {"codec": codec, "width": width, "parts": parts, "weights": weights}


@st.composite
def _encoded(draw: st.DrawFn, codec: kd.TopK, width: int, n: int) -> dict[str, np.ndarray]:
    level = st.one_of(st.integers(-3, 3).map(float), st.floats(-12, 12, width=32))
    rows = draw(hnp.arrays(np.float32, (n, width), elements=level))
    if codec.kind == "probs":
        rows = softmax(rows.astype(np.float64)).astype(np.float32)
    return codec.encode(rows, "logits")


@st.composite
def _hand_written(draw: st.DrawFn, codec: kd.TopK, width: int, n: int) -> dict[str, np.ndarray]:
    perms = [draw(st.permutations(range(width)))[: codec.k] for _ in range(n)]
    low = 0.0 if codec.kind == "probs" else -6.0
    values = draw(hnp.arrays(np.float32, (n, codec.k), elements=st.floats(low, 1, width=32)))
    parts = {
        "values": -np.sort(-values, axis=1),
        "indices": np.asarray(perms, dtype=np.uint16).reshape(n, codec.k),
    }
    if codec.tail:
        tail = st.floats(0, 0.875 if codec.kind == "logits" else 1, width=32)
        parts["tail"] = draw(hnp.arrays(np.float32, (n,), elements=tail))
    return parts


def weighted(case: dict[str, Any]) -> kd.WeightedMean:
    return kd.WeightedMean(case["weights"])


# ----------------------------------------------------------------- against the dense mixture


@FAST
@given(teachers())
def test_compact_mean_is_the_top_k_of_the_dense_mixture(case: dict[str, Any]) -> None:
    codec, width, parts = case["codec"], case["width"], case["parts"]
    merged = merge_compact(codec, width, parts, weighted(case))
    assert_top_k_of(dense_mixture(codec, width, parts, case["weights"]), merged, codec)
    assert merged["values"].dtype == np.float32
    assert merged["indices"].dtype == parts[0]["indices"].dtype


@FAST
@given(teachers(hand_written=True))
def test_hand_written_tails_can_make_unstored_classes_win(case: dict[str, Any]) -> None:
    codec, width, parts = case["codec"], case["width"], case["parts"]
    merged = merge_compact(codec, width, parts, weighted(case))
    assert_top_k_of(dense_mixture(codec, width, parts, case["weights"]), merged, codec)


@FAST
@given(teachers(), st.data())
def test_sequences_merge_step_by_step(case: dict[str, Any], data: st.DataObject) -> None:
    codec, width, parts = case["codec"], case["width"], case["parts"]
    steps = len(parts[0]["values"])
    cuts = sorted(data.draw(st.lists(st.integers(0, steps), max_size=3)))
    lengths = np.diff([0, *cuts, steps])
    ragged = [{c: kd.Ragged.from_lengths(v, lengths) for c, v in p.items()} for p in parts]
    merged = merge_compact(codec, width, ragged, weighted(case), shape=(None, width))
    flat = merge_compact(codec, width, parts, weighted(case))
    assert set(merged) == set(flat)
    for component, value in merged.items():
        np.testing.assert_array_equal(value.lengths, lengths)
        np.testing.assert_array_equal(value.values, flat[component])


@FAST
@given(teachers())
def test_decoded_mean_is_the_dense_mixture_too(case: dict[str, Any]) -> None:
    codec, width, parts = case["codec"], case["width"], case["parts"]
    decoded = [codec.decode(p, np.dtype(np.float32), (width,)) for p in parts]
    merged = merge_compact(codec, width, decoded, weighted(case)).astype(np.float64)
    q = dense_mixture(codec, width, parts, case["weights"])
    # Log-probabilities for logits (not the mean of the decoded logits), else probabilities.
    got = np.exp(merged) if codec.kind == "logits" else merged
    np.testing.assert_allclose(got, q, rtol=0, atol=ATOL)


def test_the_union_of_supports_is_mixed_with_each_teachers_tail() -> None:
    codec = kd.TopK(2, kind="probs")
    a = {"values": np.array([[0.6, 0.3]]), "indices": np.array([[0, 1]]), "tail": np.array([0.1])}
    b = {"values": np.array([[0.5, 0.4]]), "indices": np.array([[2, 1]]), "tail": np.array([0.1])}
    merged = merge_compact(codec, 10, [a, b], "mean")
    # class 1: (0.3 + 0.4) / 2; class 0: 0.6 / 2 plus half of b's tail share 0.1 / 8
    np.testing.assert_allclose(merged["values"], [[0.35, 0.30625]], rtol=1e-6)
    np.testing.assert_array_equal(merged["indices"], [[1, 0]])
    np.testing.assert_allclose(merged["tail"], [1 - 0.35 - 0.30625], rtol=1e-6)
    logits = kd.TopK(2)
    log = {**a, "values": np.log(a["values"])}  # log-probabilities: the same teacher as a
    merged = merge_compact(logits, 10, [log, {**b, "values": np.log(b["values"]) + 5}], "mean")
    np.testing.assert_allclose(np.exp(merged["values"]), [[0.35, 0.30625]], rtol=1e-6)


def test_weights_move_the_mixture() -> None:
    codec = kd.TopK(1, kind="probs", tail=False)
    a = {"values": np.array([[0.9]]), "indices": np.array([[3]])}
    b = {"values": np.array([[0.8]]), "indices": np.array([[5]])}
    assert merge_compact(codec, 8, [a, b], "mean")["indices"].tolist() == [[3]]
    merged = merge_compact(codec, 8, [a, b], kd.WeightedMean({"a": 1, "b": 2}))
    assert merged["indices"].tolist() == [[5]]
    np.testing.assert_allclose(merged["values"], [[0.8 * 2 / 3]], rtol=1e-6)


def test_a_large_tail_lets_the_lowest_unstored_classes_in() -> None:
    codec = kd.TopK(3, kind="probs")
    a = {"values": np.array([[0.06, 0.05, 0.01]]), "indices": np.array([[3, 1, 0]])}
    merged = merge_compact(codec, 5, [{**a, "tail": np.array([0.88])}] * 2, "mean")
    np.testing.assert_array_equal(merged["indices"], [[2, 4, 3]])  # 0.44 each for 2 and 4
    np.testing.assert_allclose(merged["values"], [[0.44, 0.44, 0.06]], rtol=1e-6)
    np.testing.assert_allclose(merged["tail"], [0.06], rtol=1e-5)


def test_ties_with_unstored_classes_go_to_the_stored_ones() -> None:
    codec = kd.TopK(1, kind="probs")
    flat = {"values": np.array([[0.25]]), "indices": np.array([[2]]), "tail": np.array([0.75])}
    merged = merge_compact(codec, 4, [flat, flat], "mean")  # every class has 0.25
    np.testing.assert_array_equal(merged["indices"], [[2]])
    np.testing.assert_allclose(merged["tail"], [0.75])


# ----------------------------------------------------------------------------- refusals


def test_compact_merges_of_other_strategies_and_codecs_are_refused() -> None:
    topk = kd.Schema([kd.Field("logits", "float32", (6,), codec=kd.TopK(2))])
    other_k = kd.Schema([kd.Field("logits", "float32", (6,), codec=kd.TopK(3))])
    fp16 = kd.Schema([kd.Field("logits", "float32", (6,), codec="fp16")])
    message = r"decode=False cannot merge coded field\(s\) \['logits'\] in compact form"
    for schemas, strategy in [
        ({"a": topk, "b": topk}, "max"),
        ({"a": topk, "b": topk}, kd.Take("a")),
        ({"a": topk, "b": other_k}, "mean"),
        ({"a": topk, "b": topk.with_codecs({"logits": kd.TopK(2, "probs")})}, "mean"),
        ({"a": fp16, "b": fp16}, "mean"),
        ({"a": topk, "b": fp16}, "mean"),
    ]:
        with pytest.raises(kd.MergeError, match=message) as info:
            Merger(schemas, {"logits": strategy}).check_compact()
        assert info.value.field == "logits"
    Merger({"a": topk, "b": topk}, {"logits": "mean"}).check_compact()
    Merger({"a": topk, "b": kd.Schema([])}).check_compact()  # one teacher: passes through


def test_teachers_with_different_k_still_mix_when_decoded() -> None:
    a, b = kd.TopK(1), kd.TopK(3)
    schemas = {
        t: kd.Schema([kd.Field("logits", "float32", (6,), codec=c)])
        for t, c in (("a", a), ("b", b))
    }
    rows = np.random.default_rng(0).normal(size=(2, 3, 6)).astype(np.float32)
    parts = [a.encode(rows[0], "logits"), b.encode(rows[1], "logits")]
    decoded = {
        t: {SID: np.arange(3), "logits": c.decode(p, np.dtype(np.float32), (6,))}
        for t, c, p in (("a", a, parts[0]), ("b", b, parts[1]))
    }
    merged = Merger(schemas, {"logits": "mean"}).merge(decoded)["logits"]
    q = (distribution(a, 6, parts[0]) + distribution(b, 6, parts[1])) / 2
    np.testing.assert_allclose(np.exp(merged), q, rtol=0, atol=ATOL)


# --------------------------------------------------------------------------- real stores

VOCAB, K, N = 30, 4, 40


def dump_teachers(tmp_path: Path, codec: kd.TopK, shape: tuple[int | None, ...]) -> list[Any]:
    """Two stores of the same samples with different knowledge; returns each teacher's
    knowledge per sample (arrays, or lists of per-step arrays for sequences)."""
    rng = np.random.default_rng(7)
    keep = kd.Schema([kd.Field("logits", "float32", shape, codec=codec)])
    lengths = rng.integers(0, 6, N)
    knowledge = []
    for name, scale in (("a", 1.0), ("b", 3.0)):
        if shape[0] is None:
            rows: Any = [
                rng.normal(scale=scale, size=(n, VOCAB)).astype(np.float32) for n in lengths
            ]
        else:
            rows = rng.normal(scale=scale, size=(N, VOCAB)).astype(np.float32)
        if codec.kind == "probs":
            rows = [softmax(r).astype(np.float32) for r in rows]
            rows = rows if shape[0] is None else np.stack(rows)
        data = [{"x": rows[i : i + 16], SID: np.arange(i, min(i + 16, N))} for i in range(0, N, 16)]
        kd.dump(lambda f: {"logits": f["x"]}, data, tmp_path / name, keep=keep, progress=False)
        knowledge.append(rows)
    return knowledge


def expected(codec: kd.TopK, knowledge: list[Any], weights: list[float], ids: np.ndarray) -> Any:
    """The dense mixture of what each teacher stored for ``ids`` (steps packed)."""
    dists = []
    for rows in knowledge:
        samples = np.concatenate([np.reshape(rows[i], (-1, VOCAB)) for i in ids])
        dists.append(distribution(codec, VOCAB, codec.encode(samples, "logits")))
    return sum(w / sum(weights) * d for w, d in zip(weights, dists, strict=True))


@pytest.mark.parametrize(
    "codec",
    [kd.TopK(K), kd.TopK(K, kind="probs"), kd.TopK(K, tail=False), kd.TopK(K, values="uint8")],
    ids=repr,
)
def test_a_student_merges_two_top_k_stores_compactly(tmp_path: Path, codec: kd.TopK) -> None:
    knowledge = dump_teachers(tmp_path, codec, (VOCAB,))
    strategy = kd.WeightedMean({"a": 3.0, "b": 1.0})
    with kd.Student(merge_strategy={"logits": strategy}, shuffle=True, seed=3) as student:
        student.add_store(tmp_path / "a", name="a")
        student.add_store(tmp_path / "b", name="b")
        seen = []
        for batch in student.loader(batch_size=12, decode=False):
            parts = batch["logits"]
            assert parts["values"].shape == (len(batch[SID]), K)
            assert_top_k_of(expected(codec, knowledge, [3, 1], batch[SID]), parts, codec)
            seen.extend(batch[SID].tolist())
        assert sorted(seen) == list(range(N))
        dense = next(iter(student.loader(batch_size=N)))
        q = expected(codec, knowledge, [3, 1], dense[SID])
        got = np.exp(dense["logits"]) if codec.kind == "logits" else dense["logits"]
        np.testing.assert_allclose(got, q, rtol=0, atol=ATOL)


def test_a_student_merges_top_k_sequences_compactly(tmp_path: Path) -> None:
    codec = kd.TopK(K)
    knowledge = dump_teachers(tmp_path, codec, (None, VOCAB))
    with kd.Student(merge_strategy={"logits": "mean"}) as student:
        student.add_store(tmp_path / "a")
        student.add_store(tmp_path / "b")
        batches = list(student.get_knowledge_generator(batch_size=16, decode=False)())
    assert sum(len(b[SID]) for b in batches) == N
    for batch in batches:
        parts = batch["logits"]
        assert set(parts) == {"values", "indices", "tail"}
        lengths = [len(knowledge[0][i]) for i in batch[SID]]
        for value in parts.values():
            np.testing.assert_array_equal(value.lengths, lengths)
        packed = {c: v.values for c, v in parts.items()}
        assert_top_k_of(expected(codec, knowledge, [1, 1], batch[SID]), packed, codec)


def test_a_student_still_refuses_compact_max_of_top_k(tmp_path: Path) -> None:
    dump_teachers(tmp_path, kd.TopK(K), (VOCAB,))
    with kd.Student(merge_strategy={"logits": "max"}) as student:
        student.add_store(tmp_path / "a")
        student.add_store(tmp_path / "b")
        with pytest.raises(kd.KdserveError, match=r"decode=False cannot merge coded field"):
            student.loader(batch_size=8, decode=False)
        assert next(iter(student.loader(batch_size=8)))["logits"].shape == (8, VOCAB)


def test_top_p_teachers_mix_into_the_top_p_of_their_mixture() -> None:
    """Teachers coded with top-p keep different numbers of classes per position; their
    compact mean is the mixture's own nucleus, as decoding and re-coding it densely gives."""
    width, codec = 30, kd.TopK(10, p=0.75, min_k=2)
    rng = np.random.default_rng(3)
    parts = [codec.encode((rng.normal(size=(8, width)) * 3).astype(np.float32), "l") for _ in "ab"]
    assert all(np.isneginf(p["values"]).any() for p in parts)  # some slots left unused
    merged = merge_compact(codec, width, parts, kd.WeightedMean([0.3, 0.7]))
    dense = dense_mixture(codec, width, parts, [0.3, 0.7])
    expected = codec.encode(np.log(dense).astype(np.float32), "l")
    f32 = np.dtype(np.float32)
    np.testing.assert_allclose(
        softmax(codec.decode(merged, f32, (width,))),
        softmax(codec.decode(expected, f32, (width,))),
        rtol=1e-4,
        atol=1e-7,
    )
    np.testing.assert_array_equal(np.isneginf(merged["values"]), np.isneginf(expected["values"]))
