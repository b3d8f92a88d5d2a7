"""Merging teachers: each strategy against its numpy formula, refusals, alignment by sample id."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kdserve as kd
from kdserve.core.merge import Custom, Merger, strategy_from_spec

FAST = settings(max_examples=50, deadline=None)
SID = kd.SAMPLE_ID


def logits_schema(dtype="float32", shape=(4,), name="logits", **extra):
    """A schema with one ``name`` field, plus any ``extra`` fields given as (dtype, shape)."""
    fields = [kd.Field(name, dtype, shape)]
    fields += [kd.Field(n, dt, sh) for n, (dt, sh) in extra.items()]
    return kd.Schema(fields)


def teachers_batches(names, n=5, dtype=np.float32, shape=(4,), seed=0, ids=None):
    """One batch per teacher with the same sample ids and random ``logits``."""
    rng = np.random.default_rng(seed)
    ids = np.arange(100, 100 + n, dtype=np.int64) if ids is None else np.asarray(ids)
    batches = {}
    for t in names:
        values = rng.normal(scale=4, size=(n, *shape))
        if np.issubdtype(dtype, np.integer):
            values = rng.integers(-50, 50, size=(n, *shape))
        batches[t] = {SID: ids.copy(), "logits": values.astype(dtype)}
    return batches


def stacked(batches, field="logits"):
    """The teachers' values as float64, stacked on a new first axis (registration order)."""
    return np.stack([b[field].astype(np.float64) for b in batches.values()])


def merge(names, strategy, batches, schema=None):
    schema = logits_schema() if schema is None else schema
    merger = Merger(dict.fromkeys(names, schema), {"logits": strategy})
    return merger.merge(batches)


def ragged(sequences, dtype=np.float32):
    return kd.Ragged.from_list([np.asarray(s, dtype=dtype) for s in sequences])


# ------------------------------------------------------------------------------ strategies


FORMULAS = {
    "sum": lambda x: x[0] + x[1] + (x[2] if len(x) > 2 else 0),
    "mean": lambda x: sum(x) / len(x),
    "max": lambda x: np.maximum.reduce(list(x)),
    "min": lambda x: np.minimum.reduce(list(x)),
}


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
@pytest.mark.parametrize("strategy", sorted(FORMULAS))
def test_named_strategies_equal_their_formula(strategy, names):
    batches = teachers_batches(names)
    out = merge(names, strategy, batches)
    expected = FORMULAS[strategy](stacked(batches))
    assert out["logits"].dtype == np.float32 and out["logits"].shape == (5, 4)
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[SID], batches["a"][SID])


@pytest.mark.parametrize("strategy", [kd.Sum(), kd.Mean(), kd.Max(), kd.Min()])
def test_strategy_objects_equal_their_names(strategy):
    batches = teachers_batches("ab")
    by_object = merge("ab", strategy, batches)["logits"]
    expected = FORMULAS[strategy.name](stacked(batches))
    np.testing.assert_allclose(by_object, expected, rtol=1e-6, atol=1e-6)
    assert strategy_from_spec(strategy.name) == strategy


@pytest.mark.parametrize("strategy", sorted(FORMULAS))
def test_float16_fields_stay_float16(strategy):
    batches = teachers_batches("abc", dtype=np.float16)
    out = merge("abc", strategy, batches, logits_schema("float16"))["logits"]
    assert out.dtype == np.float16
    expected = FORMULAS[strategy](stacked(batches))
    # The exact result rounded to float16 once (a float32 intermediate may add a second
    # rounding), not a float16 rounding after every addition.
    assert np.all(np.abs(out - expected) <= 2.0**-10 * np.abs(expected) + 2.0**-24)


@pytest.mark.parametrize("strategy", sorted(FORMULAS))
def test_int_fields_keep_their_dtype(strategy):
    batches = teachers_batches("ab", dtype=np.int32)
    # Make each mean an exact integer, so the expected value does not depend on rounding.
    batches["b"]["logits"] += batches["b"]["logits"] % 2 != batches["a"]["logits"] % 2
    out = merge("ab", strategy, batches, logits_schema("int32"))["logits"]
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, FORMULAS[strategy](stacked(batches)))


def test_weighted_mean_by_teacher_name():
    batches = teachers_batches("abc")
    weights = {"a": 1.0, "b": 3.0, "c": 0.5, "unused": 7.0}
    out = merge("abc", kd.WeightedMean(weights), batches)["logits"]
    a, b, c = stacked(batches)
    np.testing.assert_allclose(out, (1 * a + 3 * b + 0.5 * c) / 4.5, rtol=1e-6, atol=1e-6)
    assert out.dtype == np.float32


def test_weighted_mean_by_position():
    batches = teachers_batches("abc")
    out = merge("abc", kd.WeightedMean([0.2, 0.0, 0.6]), batches)["logits"]
    a, _, c = stacked(batches)
    np.testing.assert_allclose(out, (0.2 * a + 0.6 * c) / 0.8, rtol=1e-6, atol=1e-6)


def test_weighted_mean_of_int_and_float16_fields_keeps_the_dtype():
    ints = teachers_batches("ab", dtype=np.int64)
    ints["a"]["logits"] *= 4
    ints["b"]["logits"] *= 4
    out = merge("ab", kd.WeightedMean({"a": 1, "b": 3}), ints, logits_schema("int64"))["logits"]
    a, b = stacked(ints)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, (a + 3 * b) / 4)
    halves = teachers_batches("ab", dtype=np.float16)
    out = merge("ab", kd.WeightedMean([1, 1]), halves, logits_schema("float16"))["logits"]
    assert out.dtype == np.float16
    np.testing.assert_allclose(out, stacked(halves).mean(axis=0), rtol=2.0**-11, atol=2.0**-24)


@pytest.mark.parametrize(("spec", "index"), [("b", 1), ("c", 2), (0, 0), (1, 1), (-1, 2)])
def test_take_picks_one_teacher_by_name_or_index(spec, index):
    batches = teachers_batches("abc")
    out = merge("abc", kd.Take(spec), batches)["logits"]
    np.testing.assert_array_equal(out, batches["abc"[index]]["logits"])


def test_take_casts_to_the_declared_dtype():
    batches = teachers_batches("ab", dtype=np.float64)
    out = merge("ab", kd.Take("b"), batches)["logits"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, batches["b"]["logits"].astype(np.float32))


def test_callable_strategy_gets_every_teacher_in_registration_order():
    batches = teachers_batches("cab")  # registration order c, a, b
    seen = []

    def blend(values):
        seen.append(list(values))
        return 2 * values["a"] - values["b"] + values["c"] ** 2

    out = merge("cab", blend, batches)["logits"]
    assert seen == [["c", "a", "b"]]
    c, a, b = stacked(batches)
    np.testing.assert_allclose(out, 2 * a - b + c**2, rtol=1e-5, atol=1e-5)
    assert out.dtype == np.float32


def test_callable_returning_a_list_is_converted_and_cast():
    batches = teachers_batches("ab")
    out = merge("ab", lambda v: (v["a"] * v["b"]).tolist(), batches)["logits"]
    a, b = stacked(batches)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, a * b, rtol=1e-5, atol=1e-5)


def test_callable_returning_the_wrong_shape_is_refused():
    batches = teachers_batches("ab")
    with pytest.raises(kd.MergeError, match=r"returned shape \(5,\), expected \(5, 4\)"):
        merge("ab", lambda v: v["a"].sum(axis=1), batches)


def test_strategy_from_spec_resolves_names_objects_classes_and_callables():
    assert strategy_from_spec("mean") == kd.Mean()
    take = kd.Take("a")
    assert strategy_from_spec(take) is take
    assert strategy_from_spec(kd.Max) == kd.Max()  # the class, not an instance
    assert isinstance(strategy_from_spec(np.median), Custom)
    with pytest.raises(kd.MergeError, match=r"class WeightedMean, which needs arguments"):
        strategy_from_spec(kd.WeightedMean, "logits")
    with pytest.raises(kd.MergeError, match="must be a name, a strategy or a callable"):
        strategy_from_spec(3, "logits")


def test_a_strategy_class_merges_like_its_instance():
    batches = teachers_batches("ab")
    out = merge("ab", kd.Mean, batches)["logits"]
    np.testing.assert_allclose(out, stacked(batches).mean(axis=0), rtol=1e-6, atol=1e-6)


@st.composite
def teacher_sets(draw):
    n_teachers = draw(st.integers(2, 3))
    rows = draw(st.integers(1, 6))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=4))
    values = draw(
        hnp.arrays(np.float32, (n_teachers, rows, *shape), elements=st.floats(-1e3, 1e3, width=32))
    )
    return values


@FAST
@given(
    teacher_sets(),
    st.sampled_from(["sum", "mean", "max", "min", "weighted", "take"]),
    st.data(),
)
def test_merging_random_teachers_equals_the_numpy_reduction(values, strategy, data):
    names = [f"t{i}" for i in range(len(values))]
    schema = logits_schema(shape=values.shape[2:])
    ids = np.arange(values.shape[1], dtype=np.int64) * 7
    batches = {t: {SID: ids, "logits": v} for t, v in zip(names, values, strict=True)}
    x = values.astype(np.float64)
    if strategy == "weighted":
        weights = data.draw(st.lists(st.integers(1, 5), min_size=len(names), max_size=len(names)))
        spec = kd.WeightedMean(weights)
        expected = np.tensordot(np.array(weights, dtype=np.float64), x, axes=1) / sum(weights)
    elif strategy == "take":
        pick = data.draw(st.integers(0, len(names) - 1))
        spec, expected = kd.Take(names[pick]), x[pick]
    else:
        spec, expected = strategy, FORMULAS[strategy](x)
    out = merge(names, spec, batches, schema)
    assert out["logits"].dtype == np.float32 and out["logits"].shape == values.shape[1:]
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-6, atol=1e-3)
    np.testing.assert_array_equal(out[SID], ids)


# ------------------------------------------------------------------- fields and refusals


def test_fields_of_a_single_teacher_pass_through_unchanged():
    schemas = {
        "a": logits_schema(hidden=("float16", (3,))),
        "b": logits_schema(mask=("bool", (4,)), tokens=("float32", (None, 2))),
    }
    batches = teachers_batches("ab")
    batches["a"]["hidden"] = np.arange(15, dtype=np.float16).reshape(5, 3)
    batches["b"]["mask"] = np.arange(20).reshape(5, 4) % 3 == 0
    batches["b"]["tokens"] = ragged([np.full((i, 2), i) for i in range(5)])
    merger = Merger(schemas, {"logits": "max"})
    out = merger.merge(batches)
    assert list(out) == [SID, "logits", "hidden", "mask", "tokens"]
    assert out["hidden"] is batches["a"]["hidden"]
    assert out["mask"] is batches["b"]["mask"]
    assert out["tokens"] is batches["b"]["tokens"]
    assert merger.schema.names == ["logits", "hidden", "mask", "tokens"]


def test_merged_schema_is_codec_free_and_teachers_may_use_different_codecs():
    a = kd.Schema([kd.Field("logits", "float32", (4,), codec="fp16")])
    b = kd.Schema([kd.Field("logits", "float32", (4,), codec={"name": "topk", "k": 2})])
    merger = Merger({"a": a, "b": b}, {"logits": "mean"})
    assert merger.schema["logits"] == kd.Field("logits", "float32", (4,))
    assert merger.schema["logits"].codec is None


def test_a_shared_field_without_a_strategy_is_refused():
    schemas = {"a": logits_schema(), "b": logits_schema(), "c": logits_schema("float32", (2,), "x")}
    with pytest.raises(kd.MergeError) as info:
        Merger(schemas)
    message = str(info.value)
    assert "field 'logits' comes from teachers ['a', 'b'] but has no merge strategy" in message
    assert info.value.field == "logits"


def test_a_strategy_for_a_field_nobody_produces_is_refused():
    schemas = {"a": logits_schema(), "b": logits_schema()}
    with pytest.raises(
        kd.MergeError, match=r"field\(s\) \['logit'\] that no teacher produces"
    ) as e:
        Merger(schemas, {"logits": "mean", "logit": "mean"})
    assert e.value.field == "logit"
    assert "the teachers produce ['logits']" in str(e.value)


def test_an_unknown_strategy_name_is_refused():
    schemas = {"a": logits_schema(), "b": logits_schema()}
    with pytest.raises(kd.MergeError, match="unknown merge strategy 'median' for field 'logits'"):
        Merger(schemas, {"logits": "median"})


@pytest.mark.parametrize("teacher", ["c", "nobody", 2, 7])
def test_take_of_a_teacher_without_the_field_is_refused(teacher):
    schemas = {"a": logits_schema(), "b": logits_schema(), "c": logits_schema(name="other")}
    with pytest.raises(kd.MergeError, match="does not produce it") as info:
        Merger(schemas, {"logits": kd.Take(teacher)})
    assert info.value.field == "logits"
    assert "['a', 'b']" in str(info.value)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"a": 1.0}, "needs one weight per teacher"),
        ({"a": 1.0, "c": 1.0}, "needs one weight per teacher"),
        ([1.0], "needs one weight per teacher"),
        ([1.0, 2.0, 3.0], "needs one weight per teacher"),
        ({"a": 1.0, "b": -0.5}, ">= 0 with a positive sum"),
        ([0.0, 0.0], "positive sum"),
        ([float("nan"), 1.0], "finite"),
        ([float("inf"), 1.0], "finite"),
    ],
)
def test_weighted_mean_with_missing_or_bad_weights_is_refused(weights, message):
    schemas = {"a": logits_schema(), "b": logits_schema()}
    with pytest.raises(kd.MergeError, match=re.escape(message)) as info:
        Merger(schemas, {"logits": kd.WeightedMean(weights)})
    assert info.value.field == "logits"


@pytest.mark.parametrize(
    ("other", "shown"),
    [
        (kd.Field("logits", "float64", (4,)), "float64[4]"),
        (kd.Field("logits", "float32", (5,)), "float32[5]"),
        (kd.Field("logits", "float32", (None, 4)), "float32[None, 4]"),
        (kd.Field("logits", "float32", ()), "float32[]"),
    ],
)
def test_teachers_disagreeing_on_a_shared_field_are_refused(other, shown):
    schemas = {"a": logits_schema(), "b": logits_schema(), "c": kd.Schema([other])}
    with pytest.raises(kd.MergeError) as info:
        Merger(schemas, {"logits": "mean"})
    message = str(info.value)
    assert "field 'logits' differs between teachers ['a', 'b'] (float32[4])" in message
    assert f"and 'c' ({shown})" in message
    assert info.value.field == "logits"


def test_a_merger_needs_a_teacher():
    with pytest.raises(kd.MergeError, match="at least one teacher"):
        Merger({})


def test_merging_needs_every_teachers_batch_and_fields():
    merger = Merger({"a": logits_schema(), "b": logits_schema()}, {"logits": "sum"})
    batches = teachers_batches("ab")
    with pytest.raises(kd.MergeError, match=r"no batch from teacher\(s\) \['b'\]"):
        merger.merge({"a": batches["a"]})
    del batches["b"]["logits"]
    with pytest.raises(kd.MergeError, match=r"teacher 'b' lacks \['logits'\]") as info:
        merger.merge(batches)
    assert info.value.field == "logits"
    del batches["a"][SID]
    with pytest.raises(kd.MergeError, match=r"teacher 'a' lacks \['sample_id'\]"):
        merger.merge(batches)


def test_a_single_teacher_merges_to_itself():
    batches = teachers_batches("a")
    out = Merger({"a": logits_schema()}).merge(batches)
    assert out["logits"] is batches["a"]["logits"]
    np.testing.assert_array_equal(out[SID], batches["a"][SID])


# ------------------------------------------------------------------------------ alignment


def test_the_same_ids_in_another_order_are_reordered():
    ids = np.array([10, 11, 12, 13, 14])
    perm = np.array([3, 0, 4, 2, 1])
    a = np.arange(20, dtype=np.float32).reshape(5, 4)
    b = 100 + a  # row i of b belongs to sample ids[i] as well ...
    sequences = [np.full((i + 1, 2), 10 + i) for i in range(5)]
    schemas = {
        "a": logits_schema(),
        "b": logits_schema(tokens=("float32", (None, 2)), only_b=("int64", ())),
    }
    batches = {
        "a": {SID: ids, "logits": a},
        # ... but b sends its rows permuted.
        "b": {
            SID: ids[perm],
            "logits": b[perm],
            "tokens": ragged([sequences[i] for i in perm]),
            "only_b": ids[perm] * 2,
        },
    }
    out = Merger(schemas, {"logits": "sum"}).merge(batches)
    np.testing.assert_array_equal(out[SID], ids)
    np.testing.assert_array_equal(out["logits"], a + b)
    np.testing.assert_array_equal(out["only_b"], ids * 2)  # values follow their ids
    assert isinstance(out["tokens"], kd.Ragged)
    assert out["tokens"].lengths.tolist() == [1, 2, 3, 4, 5]
    for got, want in zip(out["tokens"], sequences, strict=True):
        np.testing.assert_array_equal(got, want)
    assert out["tokens"].dtype == np.float32


def test_the_reference_order_is_the_first_registered_teacher():
    ids = np.array([5, 3, 9])
    batches = {
        "b": {SID: ids[::-1], "logits": np.float32([[3], [2], [1]])},
        "a": {SID: ids, "logits": np.float32([[10], [20], [30]])},
    }
    schemas = {"b": logits_schema(shape=(1,)), "a": logits_schema(shape=(1,))}
    out = Merger(schemas, {"logits": kd.Take("a")}).merge(batches)
    np.testing.assert_array_equal(out[SID], [9, 3, 5])
    np.testing.assert_array_equal(out["logits"], [[30], [20], [10]])


def test_different_sample_ids_raise_alignment_error_naming_teachers_and_ids():
    batches = teachers_batches("ab", ids=[1, 2, 3, 4, 5])
    batches["b"][SID] = np.array([1, 2, 30, 4, 5])
    merger = Merger({"a": logits_schema(), "b": logits_schema()}, {"logits": "mean"})
    with pytest.raises(kd.AlignmentError) as info:
        merger.merge(batches)
    err = info.value
    assert isinstance(err, kd.MergeError)
    assert err.teachers == ("a", "b") and err.sample_ids == (3, 30)
    message = str(err)
    assert "teachers 'a' and 'b' hold different samples" in message
    assert "at row 2 of this batch 'a' has sample_id 3 and 'b' has 30" in message


def test_the_third_teacher_is_checked_against_the_first():
    batches = teachers_batches("abc", ids=[7, 8, 9])
    batches["c"][SID] = np.array([7, 8, 10])
    merger = Merger(dict.fromkeys("abc", logits_schema()), {"logits": "mean"})
    with pytest.raises(kd.AlignmentError, match="teachers 'a' and 'c'") as info:
        merger.merge(batches)
    assert info.value.teachers == ("a", "c") and info.value.sample_ids == (9, 10)


@pytest.mark.parametrize(
    ("ids_b", "expected_ids"), [([1, 2, 3, 4], (5, None)), ([1, 2, 3, 4, 5, 6], (None, 6))]
)
def test_different_row_counts_raise_alignment_error(ids_b, expected_ids):
    batches = teachers_batches("a", ids=[1, 2, 3, 4, 5])
    batches["b"] = {SID: np.array(ids_b), "logits": np.zeros((len(ids_b), 4), np.float32)}
    merger = Merger({"a": logits_schema(), "b": logits_schema()}, {"logits": "max"})
    with pytest.raises(kd.AlignmentError, match=r"\(5 vs \d rows\)") as info:
        merger.merge(batches)
    assert info.value.teachers == ("a", "b")
    assert info.value.sample_ids == expected_ids


def test_same_ids_as_a_multiset_but_not_as_a_set_are_refused():
    # b holds the right number of rows, but repeats 2 instead of holding 3.
    batches = teachers_batches("ab", n=3, ids=[1, 2, 3])
    batches["b"][SID] = np.array([2, 1, 2])
    merger = Merger({"a": logits_schema(), "b": logits_schema()}, {"logits": "sum"})
    with pytest.raises(kd.AlignmentError):
        merger.merge(batches)


def test_duplicate_reference_ids_in_another_order_are_not_guessed():
    batches = teachers_batches("ab", n=3, ids=[1, 1, 2])
    batches["b"][SID] = np.array([1, 2, 1])
    merger = Merger({"a": logits_schema(), "b": logits_schema()}, {"logits": "sum"})
    with pytest.raises(kd.AlignmentError) as info:
        merger.merge(batches)
    assert info.value.sample_ids == (1, 2)


@st.composite
def permuted_teachers(draw):
    n = draw(st.integers(1, 8))
    ids = np.array(draw(st.lists(st.integers(-1000, 1000), min_size=n, max_size=n, unique=True)))
    perm = np.array(draw(st.permutations(range(n))))
    elements = st.floats(-100, 100, width=32)
    a = draw(hnp.arrays(np.float32, (n, 3), elements=elements))
    b = draw(hnp.arrays(np.float32, (n, 3), elements=elements))
    lengths = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    seqs = [draw(hnp.arrays(np.float32, (m, 2), elements=elements)) for m in lengths]
    return ids, perm, a, b, seqs


@FAST
@given(permuted_teachers(), st.sampled_from(["mean", "max", kd.WeightedMean([1, 2])]))
def test_permuting_one_teachers_rows_never_changes_the_merge(case, strategy):
    ids, perm, a, b, seqs = case
    schema = kd.Schema([kd.Field("logits", "float32", (3,)), kd.Field("seq", "float32", (None, 2))])
    merger = Merger({"a": schema, "b": schema}, {"logits": strategy, "seq": kd.Take("b")})
    a_batch = {SID: ids, "logits": a, "seq": ragged([np.zeros((len(s), 2)) for s in seqs])}
    b_batch = {SID: ids, "logits": b, "seq": ragged(seqs)}
    permuted = {SID: ids[perm], "logits": b[perm], "seq": ragged([seqs[i] for i in perm])}
    want = merger.merge({"a": a_batch, "b": b_batch})
    got = merger.merge({"a": a_batch, "b": permuted})
    np.testing.assert_array_equal(got[SID], ids)
    np.testing.assert_array_equal(got["logits"], want["logits"])
    assert got["seq"].equals(want["seq"])
    assert want["seq"].equals(ragged(seqs))
    # And the merge itself is the formula on rows matched by id.
    x = np.stack([a, b]).astype(np.float64)
    expected = {
        "mean": x.mean(axis=0),
        "max": x.max(axis=0),
        "weighted_mean": (x[0] + 2 * x[1]) / 3,
    }[strategy if isinstance(strategy, str) else strategy.name]
    np.testing.assert_allclose(got["logits"], expected, rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------- ragged


def sequence_schemas(names, dtype="float32"):
    return {t: kd.Schema([kd.Field("seq", dtype, (None, 3))]) for t in names}


def sequence_batches(names, lengths, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    ids = np.arange(len(lengths))
    return {
        t: {SID: ids, "seq": ragged([rng.normal(size=(m, 3)) for m in lengths], dtype)}
        for t in names
    }


@pytest.mark.parametrize("strategy", ["sum", "mean", "max", "min", kd.WeightedMean([2, 1, 1])])
def test_element_wise_strategies_merge_sequences_of_equal_lengths(strategy):
    lengths = [2, 0, 3, 1]
    batches = sequence_batches("abc", lengths)
    out = Merger(sequence_schemas("abc"), {"seq": strategy}).merge(batches)["seq"]
    assert isinstance(out, kd.Ragged)
    assert out.lengths.tolist() == lengths and out.dtype == np.float32
    x = np.stack([b["seq"].values.astype(np.float64) for b in batches.values()])
    if isinstance(strategy, kd.WeightedMean):
        expected = (2 * x[0] + x[1] + x[2]) / 4
    else:
        expected = FORMULAS[strategy](x)
    np.testing.assert_allclose(out.values, expected, rtol=1e-6, atol=1e-6)


def test_float16_sequences_stay_float16():
    batches = sequence_batches("ab", [3, 1], dtype=np.float16)
    out = Merger(sequence_schemas("ab", "float16"), {"seq": "mean"}).merge(batches)["seq"]
    assert out.dtype == np.float16
    x = np.stack([b["seq"].values.astype(np.float64) for b in batches.values()])
    np.testing.assert_allclose(out.values, x.mean(axis=0), rtol=2.0**-11, atol=2.0**-24)


@pytest.mark.parametrize("strategy", ["sum", "mean", "max", "min", lambda v: v["a"] + v["b"]])
def test_element_wise_strategies_refuse_sequences_of_different_lengths(strategy):
    batches = sequence_batches("ab", [2, 3])
    batches["b"]["seq"] = ragged([np.ones((3, 3)), np.ones((2, 3))])  # same total, other split
    merger = Merger(sequence_schemas("ab"), {"seq": strategy})
    with pytest.raises(kd.MergeError, match="disagree on the sequence lengths") as info:
        merger.merge(batches)
    assert info.value.field == "seq"
    assert "Take" in str(info.value)


@pytest.mark.parametrize("pick", ["b", 1])
def test_take_merges_sequences_of_different_lengths(pick):
    batches = sequence_batches("ab", [2, 3])
    batches["b"]["seq"] = ragged([np.arange(12).reshape(4, 3), np.ones((0, 3))], np.float64)
    out = Merger(sequence_schemas("ab"), {"seq": kd.Take(pick)}).merge(batches)["seq"]
    assert out.lengths.tolist() == [4, 0]
    assert out.dtype == np.float32  # the declared dtype, not the batch's float64
    np.testing.assert_array_equal(out.values, np.arange(12).reshape(4, 3))


def test_teachers_read_back_from_arrow_with_different_codecs_merge():
    rng = np.random.default_rng(3)
    logits = {t: rng.normal(size=(4, 8)).astype(np.float32) for t in "ab"}
    schemas = {
        "a": kd.Schema([kd.Field("logits", "float32", (8,), codec="fp16")]),
        "b": kd.Schema([kd.Field("logits", "float32", (8,), codec="bf16")]),
    }
    ids = {"a": np.array([4, 5, 6, 7]), "b": np.array([7, 6, 5, 4])}
    batches = {
        t: kd.from_record_batch(
            kd.to_record_batch({"logits": logits[t]}, schemas[t], sample_ids=ids[t])
        )
        for t in "ab"
    }
    out = Merger(schemas, {"logits": "mean"}).merge(batches)
    np.testing.assert_array_equal(out[SID], ids["a"])
    expected = (logits["a"].astype(np.float64) + logits["b"][::-1]) / 2
    # fp16 and bf16 errors, each at most 2**-8 |x|, halved by the mean.
    bound = (np.abs(logits["a"]) + np.abs(logits["b"][::-1])) * 2.0**-9 + 1e-7
    assert out["logits"].dtype == np.float32
    assert np.all(np.abs(out["logits"] - expected) <= bound)


def test_integer_means_round_to_nearest_not_toward_zero():
    schema = kd.Schema([kd.Field("votes", "int32")])
    merger = Merger({"a": schema, "b": schema}, {"votes": "mean"})
    ids = np.arange(3)
    merged = merger.merge(
        {
            "a": {"sample_id": ids, "votes": np.array([3, 1, -3], np.int32)},
            "b": {"sample_id": ids, "votes": np.array([4, 4, -4], np.int32)},
        }
    )
    np.testing.assert_array_equal(merged["votes"], [4, 2, -4])  # 3.5, 2.5, -3.5: halves to even
    assert merged["votes"].dtype == np.int32


def test_ragged_rows_are_realigned_by_id_in_bulk():
    schema = kd.Schema([kd.Field("seq", "float32", (None, 2))])
    rng = np.random.default_rng(0)
    seqs = [rng.normal(size=(int(n), 2)).astype(np.float32) for n in rng.integers(0, 5, 200)]
    ids = np.arange(200)
    perm = rng.permutation(200)
    merger = Merger({"a": kd.Schema([kd.Field("x", "int64")]), "b": schema})
    merged = merger.merge(
        {
            "a": {"sample_id": ids, "x": ids},
            "b": {"sample_id": ids[perm], "seq": kd.Ragged.from_list([seqs[i] for i in perm])},
        }
    )
    for i, got in enumerate(merged["seq"]):
        np.testing.assert_array_equal(got, seqs[i])
