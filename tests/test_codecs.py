"""Codecs: each codec's documented error bound and size ratio, edge cases, Arrow round trips.

The bounds and sizes checked here are the ones in the table of ``kdserve.core.codecs``:

    fp16   |x - y| <= 2**-11 |x|  (float16 normal range)         size 0.5
    bf16   |x - y| <= 2**-8 |x|   (float32 normal range)         size 0.5
    int8   |x - y| <= max|row| / 254                             size (D + 4) / 4D
    topk   the k largest entries kept exactly, tail shared       size (k (4 + 2) + 4) / 4D
"""

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kdserve as kd
from kdserve.core.codecs import Bf16, Fp16, Int8, TopK, codec_from_spec

FAST = settings(max_examples=50, deadline=None)
F16_TINY = 2.0**-14  # smallest normal float16
F32_MAX = float(np.finfo(np.float32).max)


def roundtrip(codec, x, dtype=None):
    """Encode rows ``x`` and decode them back to ``dtype`` (default: x's dtype)."""
    dtype = np.dtype(x.dtype if dtype is None else dtype)
    parts = codec.encode(x, "f")
    return parts, codec.decode(parts, dtype, x.shape[1:])


def size_ratio(parts, x):
    """Bytes of the encoded components per byte of the float32 input."""
    assert x.dtype == np.float32
    return sum(p.nbytes for p in parts.values()) / x.nbytes


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def rest_mask(indices, width):
    """True at the entries of each row that are *not* among ``indices``."""
    mask = np.ones((*indices.shape[:-1], width), dtype=bool)
    np.put_along_axis(mask, indices.astype(np.intp), False, axis=-1)
    return mask


def int8_tolerance(x, dtype):
    """max|row| / 254 per row, plus float rounding of the float32 scale and of ``dtype``."""
    peak = np.abs(x.astype(np.float64)).max(axis=-1, keepdims=True)
    out_eps = max(float(np.finfo(dtype).eps), 2.0**-23)
    tiny = 2.0**-126 + float(np.finfo(dtype).smallest_subnormal)
    return peak / 254 * (1 + 2.0**-12) + peak * out_eps + tiny


@st.composite
def rows_of(draw, elements, dtype=np.float32, min_inner_dims=0):
    """Arrays of ``(n, *inner_shape)`` rows with 0-2 (or at least ``min_inner_dims``) inner dims."""
    n = draw(st.integers(1, 5))
    inner = draw(hnp.array_shapes(min_dims=min_inner_dims, max_dims=2, min_side=1, max_side=8))
    return draw(hnp.arrays(dtype, (n, *inner), elements=elements))


FP16_NORMAL = st.one_of(
    st.floats(F16_TINY, 65504, width=32), st.floats(-65504, -F16_TINY, width=32)
)
F32_NORMAL = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)
F32_FINITE = st.floats(width=32, allow_nan=False, allow_infinity=False)
LOGITS = st.floats(-20, 20, width=32)


# --------------------------------------------------------------------------------------- fp16


@FAST
@given(rows_of(FP16_NORMAL))
def test_fp16_relative_error_bound_in_float16_normal_range(x):
    parts, y = roundtrip(Fp16(), x)
    assert y.dtype == np.float32 and y.shape == x.shape
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    assert np.all(np.abs(x64 - y64) <= 2.0**-11 * np.abs(x64))
    assert size_ratio(parts, x) == 0.5


@FAST
@given(rows_of(st.floats(-F16_TINY, F16_TINY, width=32)))
def test_fp16_subnormal_range_has_half_a_subnormal_step_of_absolute_error(x):
    _, y = roundtrip(Fp16(), x)
    assert np.all(np.abs(x.astype(np.float64) - y) <= 2.0**-25)


@FAST
@given(rows_of(st.one_of(st.floats(F16_TINY, 65504), st.floats(-65504, -F16_TINY)), np.float64))
def test_fp16_on_float64_fields_decodes_to_float64(x):
    _, y = roundtrip(Fp16(), x)
    assert y.dtype == np.float64
    assert np.all(np.abs(x - y) <= 2.0**-11 * np.abs(x))


@pytest.mark.parametrize("value", [65505.0, 65519.0, 65520.0, 1e6, -70000.0, F32_MAX])
def test_fp16_refuses_values_beyond_65504_and_points_to_bf16(value):
    x = np.array([[1.0, value, 2.0]], dtype=np.float32)
    with pytest.raises(kd.CodecError, match="bf16") as info:
        Fp16().encode(x, "logits")
    assert info.value.field == "logits" and info.value.codec == "fp16"
    assert "65504" in str(info.value)


def test_fp16_keeps_65504_and_non_finite_values():
    x = np.array([[65504.0, -65504.0, np.inf, -np.inf, np.nan, -0.0]], dtype=np.float32)
    _, y = roundtrip(Fp16(), x)
    assert y[0, :4].tolist() == [65504.0, -65504.0, np.inf, -np.inf]
    assert np.isnan(y[0, 4]) and y[0, 5] == 0 and np.signbit(y[0, 5])


# --------------------------------------------------------------------------------------- bf16


@FAST
@given(rows_of(F32_NORMAL))
def test_bf16_relative_error_bound_over_float32_normal_range(x):
    parts, y = roundtrip(Bf16(), x)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.all(np.isfinite(y))
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    assert np.all(np.abs(x64 - y64) <= 2.0**-8 * np.abs(x64))
    assert size_ratio(parts, x) == 0.5
    assert parts["data"].dtype == np.uint16


@FAST
@given(rows_of(st.floats(-(2.0**-126), 2.0**-126, width=32)))
def test_bf16_subnormals_have_half_a_bf16_subnormal_step_of_error(x):
    _, y = roundtrip(Bf16(), x)
    assert np.all(np.abs(x.astype(np.float64) - y) <= 2.0**-134)


def _bf16_bits(upper, lower):
    """The float32 whose bit pattern is ``upper`` (the bf16 half) followed by ``lower``."""
    return np.array([[(upper << 16) | lower]], dtype=np.uint32).view(np.float32)


@FAST
@given(
    sign=st.integers(0, 1),
    exponent=st.integers(0, 0xFD),  # up to 0xFD, so rounding up never reaches inf
    mantissa=st.integers(0, 0x7F),
    lower=st.integers(0, 0xFFFF),
)
def test_bf16_rounds_to_nearest_with_ties_to_even(sign, exponent, mantissa, lower):
    upper = (sign << 15) | (exponent << 7) | mantissa
    x = _bf16_bits(upper, lower)
    up = lower > 0x8000 or (lower == 0x8000 and upper & 1)  # the tie goes to the even one
    assert Bf16().encode(x, "f")["data"][0, 0] == upper + up


def test_bf16_ties_on_known_values():
    # 1 + 2**-8 lies halfway between 1 and 1 + 2**-7 (odd mantissa): it goes to 1;
    # 1 + 3 * 2**-8 lies halfway between 1 + 2**-7 (odd) and 1 + 2**-6 (even).
    x = np.array([[1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 1 + 2.0**-8 + 2.0**-20]])
    _, y = roundtrip(Bf16(), x.astype(np.float32))
    assert y[0].tolist() == [1.0, 1 + 2.0**-6, -1.0, 1 + 2.0**-7]


def test_bf16_keeps_nan_inf_and_signed_zero():
    # NaNs whose payload sits in the dropped bits: rounding alone would turn the first
    # into inf (0x7F80) and wrap the last around to zero.
    nans = np.array([0x7F800001, 0xFFC00001, 0xFFFFFFFF], dtype=np.uint32).view(np.float32)
    x = np.array([[np.nan, *nans, np.inf, -np.inf, -0.0, 0.0]], dtype=np.float32)
    _, y = roundtrip(Bf16(), x)
    assert np.isnan(y[0, :4]).all()
    assert y[0, 4:6].tolist() == [np.inf, -np.inf]
    assert y[0, 6] == 0 and np.signbit(y[0, 6]) and not np.signbit(y[0, 7])


def test_bf16_values_above_bf16_max_stay_finite_within_the_bound():
    bf16_max = (2 - 2.0**-7) * 2.0**127
    x = np.array([[F32_MAX, -F32_MAX, 3.39e38, bf16_max]], dtype=np.float32)
    _, y = roundtrip(Bf16(), x)
    assert np.all(np.isfinite(y))
    x64 = x.astype(np.float64)
    assert np.all(np.abs(x64 - y) <= 2.0**-8 * np.abs(x64))
    assert y[0, 3] == bf16_max


def test_bf16_on_a_float16_field_does_not_overflow_at_65504():
    # 65504 has 11 significant bits; bf16 rounds it up to 65536, beyond float16's range.
    x = np.array([[65504, -65504, 1.5, np.inf]], dtype=np.float16)
    _, y = roundtrip(Bf16(), x)
    assert y.dtype == np.float16
    assert y[0].tolist() == [65504.0, -65504.0, 1.5, np.inf]


def test_bf16_refuses_float64_values_beyond_float32_range():
    with pytest.raises(kd.CodecError, match="float32's range") as info:
        Bf16().encode(np.array([[1.0, -1e39]]), "feat")
    assert info.value.field == "feat"


# --------------------------------------------------------------------------------------- int8


@FAST
@given(
    st.one_of(
        rows_of(F32_FINITE, np.float32, min_inner_dims=1),
        rows_of(st.floats(-1e6, 1e6, width=32), np.float32, min_inner_dims=1),
        rows_of(st.floats(-6e4, 6e4, width=16), np.float16, min_inner_dims=1),
        rows_of(st.floats(-(2.0**-7), 2.0**-7, width=16), np.float16, min_inner_dims=1),
        rows_of(st.floats(-1e30, 1e30), np.float64, min_inner_dims=1),
    )
)
def test_int8_error_is_within_max_abs_over_254_per_row(x):
    parts, y = roundtrip(Int8(), x)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert parts["q"].dtype == np.int8 and parts["scale"].dtype == np.float32
    assert parts["scale"].shape == x.shape[:-1]
    err = np.abs(x.astype(np.float64) - y.astype(np.float64))
    assert np.all(err <= int8_tolerance(x, x.dtype))


def test_int8_rows_peaking_at_float32_max_decode_finite():
    x = np.array([[F32_MAX, 1.0, -F32_MAX / 3], [-F32_MAX, 0.0, 5e37]], dtype=np.float32)
    _, y = roundtrip(Int8(), x)
    assert np.all(np.isfinite(y))
    assert np.all(np.abs(x.astype(np.float64) - y) <= int8_tolerance(x, np.float32))


def test_int8_small_float16_rows_keep_the_bound():
    # A float16 scale (max / 127 computed in float16) is too coarse for rows like these.
    x = np.random.default_rng(5).uniform(-1e-3, 1e-3, size=(64, 16)).astype(np.float16)
    _, y = roundtrip(Int8(), x)
    _, y32 = roundtrip(Int8(), x, dtype=np.float32)  # without float16 output rounding
    peak = np.abs(x.astype(np.float64)).max(axis=-1, keepdims=True)
    assert np.all(np.abs(x - y32.astype(np.float64)) <= peak / 254 * (1 + 2.0**-12))
    assert np.all(np.abs(x - y.astype(np.float64)) <= int8_tolerance(x, np.float16))


def test_int8_all_zero_rows_decode_to_zeros():
    x = np.zeros((4, 3, 6), dtype=np.float32)
    x[1, 2] = np.linspace(-1, 1, 6)
    x[3, 0, 0] = -0.0
    parts, y = roundtrip(Int8(), x)
    zero_rows = ~np.any(x != 0, axis=-1)
    assert zero_rows.sum() == 11
    assert np.all(parts["scale"][zero_rows] == 0)
    assert np.all(y[zero_rows] == 0)
    assert np.all(np.abs(y[1, 2] - x[1, 2]) <= 1 / 254 + 1e-7)


def test_int8_extremes_map_to_plus_minus_127():
    x = np.array([[-4.0, 1.0, 2.5, 4.0], [0.5, -0.3, 0.0, 0.125]], dtype=np.float32)
    parts, _ = roundtrip(Int8(), x)
    np.testing.assert_array_equal(parts["scale"], np.float32([4 / 127, 0.5 / 127]))
    np.testing.assert_array_equal(parts["q"], np.rint(x / (np.abs(x).max(1, keepdims=True) / 127)))
    assert parts["q"][0, 0] == -127 and parts["q"][0, 3] == 127 and parts["q"][1, 0] == 127


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_int8_refuses_non_finite_values(bad):
    x = np.ones((3, 4), dtype=np.float32)
    x[1, 2] = bad
    with pytest.raises(kd.CodecError, match="NaN or infinite") as info:
        Int8().encode(x, "feat")
    assert info.value.field == "feat" and info.value.codec == "int8"


def test_int8_refuses_float64_values_too_large_for_a_float32_scale():
    with pytest.raises(kd.CodecError, match="too large"):
        Int8().encode(np.array([[1e300, 1.0]]), "feat")


@pytest.mark.parametrize("inner", [(1,), (7,), (3, 10), (2, 3, 16), (256,)])
def test_int8_size_ratio(inner):
    x = np.random.default_rng(0).normal(size=(5, *inner)).astype(np.float32)
    parts, _ = roundtrip(Int8(), x)
    d = inner[-1]
    assert size_ratio(parts, x) == pytest.approx((d + 4) / (4 * d), rel=1e-12)


def test_int8_on_an_empty_last_axis():
    parts, y = roundtrip(Int8(), np.zeros((3, 0), dtype=np.float32))
    assert y.shape == (3, 0) and parts["scale"].tolist() == [0, 0, 0]


@pytest.mark.parametrize("codec", ["int8", {"name": "topk", "k": 1}])
def test_last_axis_codecs_refuse_scalar_fields(codec):
    with pytest.raises(kd.CodecError, match="one scalar per sample") as info:
        kd.Field("score", "float32", (), codec=codec)
    assert info.value.field == "score"
    with pytest.raises(kd.CodecError):
        codec_from_spec(codec).check("score", np.dtype(np.float32), ())
    # A sequence of scalars has no last axis per step either.
    with pytest.raises(kd.CodecError):
        kd.Field("score", "float32", (None,), codec=codec)


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8", {"name": "topk", "k": 2}])
@pytest.mark.parametrize("dtype", ["int32", "uint8", "bool"])
def test_codecs_refuse_non_float_fields(codec, dtype):
    with pytest.raises(kd.CodecError, match="applies to float fields"):
        kd.Field("labels", dtype, (5,), codec=codec)


# --------------------------------------------------------------------------------------- topk


@st.composite
def topk_cases(draw, elements=LOGITS):
    """(rows, k): rows of shape (n, *lead, width) -- lead dims as for per-token logits."""
    n = draw(st.integers(1, 4))
    lead = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=3))
    width = draw(st.integers(1, 24))
    k = draw(st.integers(1, width))
    x = draw(hnp.arrays(np.float32, (n, *lead, width), elements=elements))
    return x, k


def check_top_k_kept(x, k, parts, y):
    """The k largest entries of each row: sorted descending, at the right indices, exact."""
    values, indices = parts["values"], parts["indices"].astype(np.intp)
    expected = -np.sort(-x, axis=-1)[..., :k]
    np.testing.assert_array_equal(values, expected)
    np.testing.assert_array_equal(np.take_along_axis(x, indices, axis=-1), values)
    assert np.all(np.diff(np.sort(indices, axis=-1), axis=-1) > 0)  # k distinct entries
    np.testing.assert_array_equal(np.take_along_axis(y, indices, axis=-1), values)


@FAST
@given(topk_cases())
def test_topk_logits_keep_top_k_and_their_softmax_probabilities(case):
    x, k = case
    width = x.shape[-1]
    parts, y = roundtrip(TopK(k), x)
    assert y.dtype == np.float32 and y.shape == x.shape
    check_top_k_kept(x, k, parts, y)
    indices = parts["indices"]
    rest = rest_mask(indices, width)
    p, q = softmax(x), softmax(y)
    true_tail = np.where(rest, p, 0).sum(axis=-1)
    # The tail component is the softmax mass outside the top k, summed in float32: each
    # term's exponent x - max is rounded to float32 (|error| <= 2**-24 * 64 for the
    # logits drawn here), so each exp is within ~4e-6 of its value.
    np.testing.assert_allclose(parts["tail"], true_tail, rtol=1e-5, atol=1e-30)
    # Decoded: top-k entries get exactly their original probabilities, the rest the tail.
    np.testing.assert_allclose(
        np.take_along_axis(q, indices.astype(np.intp), axis=-1),
        np.take_along_axis(p, indices.astype(np.intp), axis=-1),
        rtol=1e-5,
    )
    np.testing.assert_allclose(np.where(rest, q, 0).sum(axis=-1), true_tail, rtol=1e-5, atol=1e-30)
    # ... spread uniformly: every non-top entry decodes to the same logit.
    has_rest = rest.any(axis=-1)
    highest = np.where(rest, y, -np.inf).max(axis=-1)
    lowest = np.where(rest, y, np.inf).min(axis=-1)
    assert np.all(highest[has_rest] == lowest[has_rest])
    assert size_ratio(parts, x) == pytest.approx((k * (4 + 2) + 4) / (4 * width), rel=1e-12)


@FAST
@given(topk_cases(elements=st.floats(-8, 8, width=32)))
def test_topk_probs_keep_top_k_and_spread_the_tail_uniformly(case):
    logits, k = case
    width = logits.shape[-1]
    x = softmax(logits).astype(np.float32)
    parts, y = roundtrip(TopK(k, kind="probs"), x)
    check_top_k_kept(x, k, parts, y)
    rest = rest_mask(parts["indices"], width)
    tail = np.clip(1 - parts["values"].astype(np.float64).sum(axis=-1), 0, 1)
    np.testing.assert_allclose(parts["tail"], tail, rtol=1e-6, atol=1e-12)
    if k < width:
        share = np.broadcast_to((tail / (width - k))[..., None], y.shape)
        np.testing.assert_allclose(y[rest], share[rest], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(y.astype(np.float64).sum(axis=-1), 1, atol=1e-5)
    total_variation = 0.5 * np.abs(x.astype(np.float64) - y).sum(axis=-1)
    assert np.all(total_variation <= tail + 1e-6)
    assert size_ratio(parts, x) == pytest.approx((k * (4 + 2) + 4) / (4 * width), rel=1e-12)


@FAST
@given(topk_cases())
def test_topk_logits_without_tail_give_the_rest_no_probability(case):
    x, k = case
    width = x.shape[-1]
    parts, y = roundtrip(TopK(k, tail=False), x)
    assert set(parts) == {"values", "indices"}
    check_top_k_kept(x, k, parts, y)
    indices = parts["indices"].astype(np.intp)
    q = softmax(y)
    assert np.all(np.where(rest_mask(indices, width), q, 0).sum(axis=-1) < 1e-30)
    top = parts["values"].astype(np.float64)
    renormalised = np.exp(top - top.max(axis=-1, keepdims=True))
    renormalised /= renormalised.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(np.take_along_axis(q, indices, axis=-1), renormalised, rtol=1e-6)
    assert size_ratio(parts, x) == pytest.approx(k * (4 + 2) / (4 * width), rel=1e-12)


@FAST
@given(topk_cases(elements=st.floats(0, 1, width=32)))
def test_topk_probs_without_tail_decode_the_rest_to_zero(case):
    x, k = case
    parts, y = roundtrip(TopK(k, kind="probs", tail=False), x)
    check_top_k_kept(x, k, parts, y)
    assert np.all(y[rest_mask(parts["indices"], x.shape[-1])] == 0)


@pytest.mark.parametrize("kind", ["logits", "probs"])
def test_topk_with_k_equal_to_width_is_lossless(kind):
    x = softmax(np.random.default_rng(1).normal(size=(4, 9))).astype(np.float32)
    parts, y = roundtrip(TopK(9, kind=kind), x)
    np.testing.assert_array_equal(y, x)
    assert np.all(parts["tail"] <= 1e-6)


def test_topk_logits_with_a_tiny_tail_store_it_accurately():
    # Tail mass 3e-40 / (1 + 3e-40): far below float64's resolution around 1.
    x = np.array([[0.0, -92.0, -92.0, -92.0]], dtype=np.float32)
    parts, y = roundtrip(TopK(1), x)
    expected = 3 * np.exp(-92.0) / (1 + 3 * np.exp(-92.0))
    assert parts["tail"][0] == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(softmax(y), softmax(x), rtol=1e-5)


def test_topk_on_token_logits_of_shape_5_by_20():
    x = np.random.default_rng(2).normal(scale=3, size=(6, 5, 20)).astype(np.float32)
    codec = TopK(4)
    codec.check("tok", np.dtype(np.float32), (5, 20))
    parts, y = roundtrip(codec, x)
    assert parts["values"].shape == (6, 5, 4) and parts["tail"].shape == (6, 5)
    check_top_k_kept(x, 4, parts, y)
    indices = parts["indices"].astype(np.intp)
    np.testing.assert_allclose(
        np.take_along_axis(softmax(y), indices, -1), np.take_along_axis(softmax(x), indices, -1)
    )
    assert size_ratio(parts, x) == pytest.approx((4 * 6 + 4) / (4 * 20), rel=1e-12)


@pytest.mark.parametrize(("width", "index_dtype"), [(65536, np.uint16), (65537, np.int32)])
def test_topk_indices_are_uint16_up_to_65536_entries(width, index_dtype):
    codec = TopK(2)
    assert codec.layout(np.dtype(np.float32), (width,))["indices"][0] == index_dtype
    x = np.zeros((1, width), dtype=np.float32)
    x[0, -1], x[0, 3] = 5.0, 4.0
    parts, y = roundtrip(codec, x)
    assert parts["indices"].dtype == index_dtype
    assert parts["indices"][0].tolist() == [width - 1, 3]
    assert y[0, -1] == 5.0 and y[0, 3] == 4.0


def test_topk_k_larger_than_the_width_is_refused():
    with pytest.raises(kd.CodecError, match="k=5 exceeds") as info:
        kd.Field("logits", "float32", (4,), codec=TopK(5))
    assert info.value.field == "logits" and info.value.codec == "topk"
    with pytest.raises(kd.CodecError, match="k=5 exceeds"):
        TopK(5).encode(np.zeros((2, 4), dtype=np.float32), "logits")


@pytest.mark.parametrize(
    "kwargs",
    [{"k": 0}, {"k": -3}, {"k": 2.5}, {"k": "8"}, {"k": True}, {"k": 3, "kind": "softmax"}],
)
def test_topk_refuses_bad_parameters(kwargs):
    with pytest.raises(kd.CodecError, match="topk"):
        TopK(**kwargs)


def test_topk_refuses_a_non_boolean_tail():
    with pytest.raises(kd.CodecError, match="tail"):
        TopK(3, tail="no")  # a truthy string would silently keep the tail


def test_topk_refuses_nan_logits():
    x = np.array([[1.0, np.nan, 0.5]], dtype=np.float32)
    with pytest.raises(kd.CodecError, match="NaN"):
        TopK(1).encode(x, "logits")


def test_topk_accepts_numpy_integers_and_stays_json_ready():
    codec = TopK(np.int64(3), tail=np.bool_(False))
    assert codec == TopK(3, tail=False)
    assert type(codec.k) is int and type(codec.tail) is bool
    assert json.loads(json.dumps(codec.to_json())) == codec.to_json()


def test_topk_keeps_masked_vocabulary_entries_but_refuses_inf_among_the_top_k():
    x = np.array([[2.0, -np.inf, 1.0, -np.inf]], dtype=np.float32)  # a masked vocabulary
    parts, y = roundtrip(TopK(2), x)
    assert parts["tail"][0] == 0 and np.all(softmax(y)[0, [1, 3]] < 1e-30)
    with pytest.raises(kd.CodecError, match="infinite"):
        TopK(3).encode(x, "logits")  # only two finite entries: a -inf would be kept
    with pytest.raises(kd.CodecError, match="infinite"):
        TopK(1).encode(np.array([[1.0, np.inf]], dtype=np.float32), "logits")


def kl_top_k(x, k, parts):
    """Mean KL(exact top-k + tail || stored top-k + tail) per row, from the compact form."""
    p = softmax(x)
    order = np.argsort(-x, axis=-1)[..., :k]
    exact = np.take_along_axis(p, order, axis=-1)
    exact = np.concatenate([exact, 1 - exact.sum(-1, keepdims=True)], -1)
    tail = parts["tail"].astype(np.float64)[..., None]
    got = np.concatenate([softmax(parts["values"]) * (1 - tail), tail], -1)
    return float(np.mean(np.sum(exact * (np.log(exact) - np.log(got)), -1)))


@FAST
@given(topk_cases(elements=st.floats(-20, 20, width=32)))
def test_topk_uint8_values_are_log_probabilities_within_a_32nd_of_a_nat(case):
    x, k = case
    codec = TopK(k, values="uint8")
    parts, y = roundtrip(codec, x)
    assert parts["values"].dtype == np.uint8
    assert np.all(parts["values"][..., 0] == 0)  # relative to the top entry
    compact = codec.to_compact(parts)
    assert compact["values"].dtype == np.float32
    exact = TopK(k).encode(x, "f")
    np.testing.assert_array_equal(compact["indices"], exact["indices"])
    np.testing.assert_array_equal(compact["tail"], exact["tail"])
    relative = exact["values"] - exact["values"][..., :1]
    reachable = relative >= -254 / 16
    err = np.abs(compact["values"] - relative)
    assert np.all(err[reachable] <= 1 / 32 + 1e-5)
    assert np.all(compact["values"][~reachable] == -254 / 16)  # clamped, never wrapped
    # The dense decode of the 8-bit form gives the same distribution as its compact form.
    np.testing.assert_allclose(
        np.take_along_axis(softmax(y), exact["indices"].astype(np.intp), -1),
        softmax(compact["values"]) * (1 - compact["tail"][..., None]),
        rtol=1e-5,
        atol=1e-12,
    )
    assert size_ratio(parts, x) == pytest.approx((k * (1 + 2) + 4) / (4 * x.shape[-1]))


def test_topk_uint8_values_cost_less_than_a_thousandth_of_a_nat_per_token():
    x = np.random.default_rng(3).normal(scale=4, size=(64, 3000)).astype(np.float32)
    for k in (16, 64):
        parts = TopK(k, values="uint8").encode(x, "f")
        compact = TopK(k, values="uint8").to_compact(parts)
        assert 0 < kl_top_k(x, k, compact) <= 1e-3
        assert kl_top_k(x, k, TopK(k).encode(x, "f")) < 1e-9  # float values: exact


def test_topk_uint8_stores_device_log_probabilities_as_host_logits():
    """A teacher that computed top-k log-probabilities itself (what decode=False and
    teacher_program(topk=...) give) stores the same codes as the host codec."""
    x = np.random.default_rng(4).normal(scale=3, size=(5, 7, 50)).astype(np.float32)
    codec = TopK(6, values="uint8")
    host = codec.encode(x, "f")
    log_p = x - np.log(np.exp(x.astype(np.float64)).sum(-1, keepdims=True))
    device = TopK(6).encode(log_p.astype(np.float32), "f")
    stored = codec.from_compact(device, "f", (7, 50))
    np.testing.assert_array_equal(stored["indices"], host["indices"])
    assert np.abs(stored["values"].astype(int) - host["values"]).max() <= 1  # rounding only
    assert codec.from_compact(host, "f", (7, 50)) == host  # codes stay codes


@pytest.mark.parametrize("codec", [TopK(3), TopK(3, values="uint8"), TopK(3, p=0.7)])
def test_topk_components_given_unsorted_are_stored_sorted(codec):
    # torch.topk(sorted=False) gives the top k in any order: uint8 codes are depths below
    # the first value, and top-p keeps a prefix, so both need them largest first.
    values = np.array([[-3.0, -0.5, -1.5]], np.float32)  # log-probabilities, tail 0.12
    indices = np.array([[4, 7, 1]], np.uint16)
    tail = np.array([1 - np.exp(values).sum()], np.float32)
    schema = kd.Schema([kd.Field("logits", "float32", (10,), codec=codec)])
    given = {"logits": {"values": values, "indices": indices, "tail": tail}}
    got = kd.from_record_batch(kd.to_record_batch(given, schema, sample_ids=[0]), decode=False)
    parts = got["logits"]
    ref = kd.from_record_batch(
        kd.to_record_batch({"logits": {"values": values[:, [1, 2, 0]],
                                       "indices": indices[:, [1, 2, 0]], "tail": tail}},
                           schema, sample_ids=[0]),
        decode=False,
    )["logits"]  # fmt: skip
    for name in parts:
        np.testing.assert_array_equal(parts[name], ref[name])
    assert parts["indices"][0, 0] == 7  # the top entry first
    if codec.values == "uint8":
        np.testing.assert_array_equal(parts["values"][0], [0.0, -1.0, -2.5])  # 1/16 nat steps
    if codec.p is not None:  # 0.61 + 0.22 reach p
        assert parts["indices"][0, 1] == 1 and np.isneginf(parts["values"][0, 2])


def test_topk_components_with_indices_beyond_the_field_are_refused():
    # e.g. a model whose embedding is padded past the declared vocabulary: the student
    # would index out of bounds (a device-side assert on CUDA).
    schema = kd.Schema([kd.Field("logits", "float32", (40,), codec=TopK(2))])
    given = {
        "values": np.array([[-0.1, -3.0]], np.float32),
        "indices": np.array([[3, 45]], np.uint16),
        "tail": np.array([0.05], np.float32),
    }
    with pytest.raises(kd.CodecError, match=r"indices in 3\.\.\.45 but its last axis holds 40"):
        kd.to_record_batch({"logits": given}, schema, sample_ids=[0])
    given["values"][0, 0] = np.nan
    given["indices"][0, 1] = 5
    with pytest.raises(kd.CodecError, match="NaN or infinite"):
        kd.to_record_batch({"logits": given}, schema, sample_ids=[0])


@pytest.mark.parametrize(
    "kwargs", [{"values": "int4"}, {"values": "uint8", "kind": "probs"}, {"values": None}]
)
def test_topk_refuses_bad_value_storage(kwargs):
    with pytest.raises(kd.CodecError, match="values"):
        TopK(4, **kwargs)


@FAST
@given(topk_cases(elements=st.floats(-10, 10, width=32)), st.floats(0.05, 1.0), st.data())
def test_top_p_keeps_the_fewest_entries_reaching_p_within_min_k_and_k(case, p, data):
    x, k = case
    min_k = data.draw(st.integers(1, k))
    codec = TopK(k, p=p, min_k=min_k)
    parts, y = roundtrip(codec, x)
    full = TopK(k).encode(x, "f")
    used = np.isfinite(parts["values"])
    count = used.sum(axis=-1)
    assert np.all((min_k <= count) & (count <= k))
    assert np.all(used[..., :1]) and np.all(np.diff(used.astype(int), axis=-1) <= 0)  # a prefix
    probs = np.take_along_axis(softmax(x), full["indices"].astype(np.intp), -1)
    kept = np.where(used, probs, 0).sum(-1)
    short = (
        np.where(used, probs, 0).sum(-1)
        - np.take_along_axis(probs, np.maximum(count - 1, 0)[..., None], -1)[..., 0]
    )
    # Enough mass (or k entries, or min_k), and one entry fewer would not have been.
    assert np.all((kept >= p * (1 - 1e-5)) | (count == k))
    assert np.all((short < p * (1 + 1e-5)) | (count == min_k))
    np.testing.assert_array_equal(parts["values"][used], full["values"][used])
    np.testing.assert_array_equal(parts["indices"][used], full["indices"][used])
    top = np.broadcast_to(full["indices"][..., :1], used.shape)
    np.testing.assert_array_equal(parts["indices"][~used], top[~used])  # unused: the top index
    np.testing.assert_allclose(parts["tail"], 1 - kept, rtol=1e-4, atol=1e-6)
    # Decoded: kept entries keep their probabilities, the rest share the tail evenly.
    q = softmax(y)
    idx = np.where(used, parts["indices"], top).astype(np.intp)
    np.testing.assert_allclose(np.take_along_axis(q, idx, -1)[used], probs[used], rtol=1e-4)
    np.testing.assert_allclose(q.sum(-1), 1, rtol=1e-6)


def test_top_p_with_uint8_values_marks_unused_slots_and_stores_device_top_k_alike():
    x = np.random.default_rng(5).normal(scale=4, size=(6, 9, 300)).astype(np.float32)
    codec = TopK(32, values="uint8", p=0.8, min_k=2)
    host = codec.encode(x, "f")
    compact = codec.to_compact(host)
    unused = host["values"] == 255
    assert unused.any() and not unused.all()  # some positions need fewer than 32 entries
    assert np.all(np.isneginf(compact["values"][unused]))
    log_p = x - np.log(np.exp(x.astype(np.float64)).sum(-1, keepdims=True))
    device = codec.from_compact(TopK(32).encode(log_p.astype(np.float32), "f"), "f", (9, 300))
    np.testing.assert_array_equal(device["indices"], host["indices"])
    assert np.abs(device["values"].astype(int) - host["values"]).max() <= 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"p": 0},
        {"p": 1.5},
        {"p": "0.9"},
        {"p": 0.9, "min_k": 0},
        {"p": 0.9, "min_k": 5},
        {"p": 0.9, "kind": "probs"},
        {"p": 0.9, "tail": False},
    ],
)
def test_top_p_refuses_bad_parameters(kwargs):
    with pytest.raises(kd.CodecError, match=r"topk (p|min_k)"):
        TopK(4, **kwargs)


# ---------------------------------------------------------------------------- codec_from_spec


@pytest.mark.parametrize(
    ("spec", "codec"),
    [
        ("fp16", Fp16()),
        ("bf16", Bf16()),
        ("int8", Int8()),
        ({"name": "fp16"}, Fp16()),
        ({"name": "topk", "k": 8}, TopK(8)),
        ({"name": "topk", "k": 3, "kind": "probs", "tail": False}, TopK(3, "probs", False)),
    ],
)
def test_codec_from_spec_resolves_names_and_dicts(spec, codec):
    resolved = codec_from_spec(spec)
    assert resolved == codec and type(resolved) is type(codec)


def test_codec_from_spec_passes_codecs_and_none_through():
    codec = TopK(2)
    assert codec_from_spec(codec) is codec
    assert codec_from_spec(None) is None


@pytest.mark.parametrize(
    "codec", [Fp16(), Bf16(), Int8(), TopK(1), TopK(16, "probs"), TopK(4, "logits", False)]
)
def test_codec_spec_round_trips_through_json(codec):
    spec = json.loads(json.dumps(codec.to_json()))
    assert spec["name"] == codec.name
    assert codec_from_spec(spec) == codec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fp8", r"unknown codec 'fp8'; choose one of \['bf16', 'fp16', 'int8', 'topk'\]"),
        ({"name": "zstd", "level": 3}, "unknown codec 'zstd'"),
        ({"name": ["fp16"]}, "unknown codec"),
        ({"k": 8}, "'name' key"),
        (8, "'name' key"),
        ({"name": "fp16", "k": 8}, "bad parameters for codec 'fp16'.*'k'"),
        ({"name": "topk"}, "bad parameters for codec 'topk'.*'k'"),
        ({"name": "topk", "k": 8, "level": 1}, "bad parameters for codec 'topk'.*'level'"),
        ({"name": "topk", "k": 0}, "k >= 1"),
    ],
)
def test_codec_from_spec_errors_name_the_problem(spec, message):
    with pytest.raises(kd.CodecError, match=message):
        codec_from_spec(spec)


# ------------------------------------------------------------------------------- Arrow e2e


def assert_within_bound(codec, x, y):
    """x -> y respects ``codec``'s documented bound (x: float32 rows, y: decoded)."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    err = np.abs(x64 - y64)
    if isinstance(codec, Fp16):
        assert np.all(err <= 2.0**-11 * np.abs(x64))
    elif isinstance(codec, Bf16):
        assert np.all(err <= 2.0**-8 * np.abs(x64))
    elif isinstance(codec, Int8):
        assert np.all(err <= int8_tolerance(x, x.dtype))
    else:
        top = -np.sort(-x, axis=-1)[..., : codec.k]
        np.testing.assert_array_equal(-np.sort(-y, axis=-1)[..., : codec.k], top)
        if codec.kind == "probs":
            tail = 1 - top.astype(np.float64).sum(axis=-1)
            assert np.all(0.5 * err.sum(axis=-1) <= tail + 1e-6)  # total variation
            np.testing.assert_allclose(y64.sum(axis=-1), 1, atol=1e-5)
        else:
            p, q = softmax(x), softmax(y)
            kept = x >= top[..., -1:]
            np.testing.assert_allclose(q[kept], p[kept], rtol=1e-5)


CODECS = [Fp16(), Bf16(), Int8(), TopK(3), TopK(3, kind="probs")]
WIDTH = 16
RATIOS = {"fp16": 0.5, "bf16": 0.5, "int8": (WIDTH + 4) / (4 * WIDTH)}


def expected_ratio(codec):
    return RATIOS.get(codec.name, (3 * (4 + 2) + 4) / (4 * WIDTH))


def sample_rows(codec, shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.1, 10, size=shape) * rng.choice([-1, 1], size=shape)
    if isinstance(codec, TopK) and codec.kind == "probs":
        x = softmax(x)
    return x.astype(np.float32)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: json.dumps(c.to_json()))
def test_coded_fixed_field_round_trips_through_arrow(codec):
    x = sample_rows(codec, (6, WIDTH))
    schema = kd.Schema([kd.Field("logits", "float32", (WIDTH,), codec=codec)])
    batch = kd.to_record_batch({"logits": x}, schema, sample_ids=np.arange(6))
    # The column holds the components; its bytes are the codec's share of the float32 bytes.
    assert batch.column(1).nbytes / x.nbytes == pytest.approx(expected_ratio(codec))
    layout = schema["logits"].layout()
    if len(layout) > 1:
        assert pa.types.is_struct(batch.column(1).type)
        assert [batch.column(1).type.field(i).name for i in range(len(layout))] == list(layout)
    back = kd.from_record_batch(batch)  # the codec comes back from the schema metadata
    assert kd.Schema.from_arrow(batch.schema)["logits"].codec == codec
    assert back["logits"].dtype == np.float32 and back["logits"].shape == x.shape
    assert_within_bound(codec, x, back["logits"])


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: json.dumps(c.to_json()))
def test_coded_sequence_field_round_trips_through_arrow(codec):
    lengths = [3, 0, 5, 1]
    steps = sample_rows(codec, (sum(lengths), WIDTH), seed=1)
    sequences = np.split(steps, np.cumsum(lengths)[:-1])
    schema = kd.Schema([kd.Field("tokens", "float32", (None, WIDTH), codec=codec)])
    batch = kd.to_record_batch({"tokens": sequences}, schema, sample_ids=[7, 8, 9, 10])
    back = kd.from_record_batch(batch, schema)
    tokens = back["tokens"]
    assert isinstance(tokens, kd.Ragged)
    assert tokens.lengths.tolist() == lengths and tokens.dtype == np.float32
    assert_within_bound(codec, steps, tokens.values)
    for got, want in zip(tokens, sequences, strict=True):
        assert got.shape == want.shape
        assert_within_bound(codec, want, got)
    assert back[kd.SAMPLE_ID].tolist() == [7, 8, 9, 10]


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: json.dumps(c.to_json()))
def test_decode_false_returns_the_components(codec):
    x = sample_rows(codec, (5, WIDTH), seed=2)
    seqs = [x[:2], x[2:]]
    schema = kd.Schema(
        [
            kd.Field("logits", "float32", (WIDTH,), codec=codec),
            kd.Field("tokens", "float32", (None, WIDTH), codec=codec),
        ]
    )
    batch = kd.to_record_batch({"logits": x[:2], "tokens": seqs}, schema, sample_ids=[1, 2])
    raw = kd.from_record_batch(batch, schema, decode=False)
    decoded = kd.from_record_batch(batch, schema)
    layout = codec.layout(np.dtype(np.float32), (WIDTH,))

    parts = raw["logits"]
    assert isinstance(parts, dict) and list(parts) == list(layout)
    for name, (dtype, shape) in layout.items():
        assert parts[name].dtype == dtype and parts[name].shape == (2, *shape)
    np.testing.assert_array_equal(
        codec.decode(parts, np.dtype(np.float32), (WIDTH,)), decoded["logits"]
    )

    seq_parts = raw["tokens"]
    assert list(seq_parts) == list(layout)
    for name, (dtype, shape) in layout.items():
        assert isinstance(seq_parts[name], kd.Ragged)
        assert seq_parts[name].lengths.tolist() == [2, 3]
        assert seq_parts[name].values.dtype == dtype
        assert seq_parts[name].values.shape == (5, *shape)
    flat = {name: r.values for name, r in seq_parts.items()}
    np.testing.assert_array_equal(
        codec.decode(flat, np.dtype(np.float32), (WIDTH,)), decoded["tokens"].values
    )


def test_int8_components_through_arrow_are_q_times_scale():
    x = sample_rows(Int8(), (4, WIDTH), seed=3)
    schema = kd.Schema([kd.Field("feat", "float32", (WIDTH,), codec="int8")])
    batch = kd.to_record_batch({"feat": x}, schema, sample_ids=np.arange(4))
    parts = kd.from_record_batch(batch, schema, decode=False)["feat"]
    peak = np.abs(x).max(axis=1)
    np.testing.assert_allclose(parts["scale"], peak / 127, rtol=1e-6)
    assert np.all(np.abs(parts["q"]).max(axis=1) == 127)
    y = kd.from_record_batch(batch, schema)["feat"]
    np.testing.assert_allclose(y, parts["q"] * parts["scale"][:, None], rtol=1e-6)


def test_token_logits_sequence_field_with_topk_through_arrow():
    rng = np.random.default_rng(4)
    sequences = [rng.normal(scale=2, size=(n, 5, 20)).astype(np.float32) for n in (2, 4, 1)]
    schema = kd.Schema([kd.Field("tok", "float32", (None, 5, 20), codec={"name": "topk", "k": 6})])
    batch = kd.to_record_batch({"tok": sequences}, schema, sample_ids=[0, 1, 2])
    back = kd.from_record_batch(batch)["tok"]
    assert back.inner_shape == (5, 20) and back.lengths.tolist() == [2, 4, 1]
    for got, want in zip(back, sequences, strict=True):
        assert_within_bound(TopK(6), want, got)
