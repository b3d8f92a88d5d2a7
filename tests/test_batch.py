"""dict <-> Arrow RecordBatch: round trips, zero-copy by buffer address, and clear errors."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kdserve as kd


def _address(array: pa.Array) -> int:
    """Address of the innermost values buffer of a (nested) list / primitive array."""
    while pa.types.is_fixed_size_list(array.type) or pa.types.is_list(array.type):
        array = array.values
    return array.buffers()[1].address


def test_fixed_shape_fields_are_wrapped_without_copying():
    logits = np.random.default_rng(0).normal(size=(8, 4, 5)).astype(np.float32)
    ids = np.arange(100, 108, dtype=np.int64)
    schema = kd.Schema([kd.Field("logits", "float32", (4, 5))])
    batch = kd.to_record_batch({"logits": logits}, schema, ids)
    assert _address(batch.column(1)) == logits.ctypes.data
    assert _address(batch.column(0)) == ids.ctypes.data
    back = kd.from_record_batch(batch, schema)
    assert back["logits"].ctypes.data == logits.ctypes.data
    assert back[kd.SAMPLE_ID].ctypes.data == ids.ctypes.data
    np.testing.assert_array_equal(back["logits"], logits)
    assert not back["logits"].flags.writeable  # views of Arrow memory are read-only


def test_sequence_fields_are_wrapped_without_copying():
    values = np.arange(30, dtype=np.float32).reshape(10, 3)
    ragged = kd.Ragged(values, np.array([0, 2, 2, 7, 10]))
    schema = kd.Schema([kd.Field("tokens", "float32", (None, 3))])
    batch = kd.to_record_batch({"tokens": ragged, "sample_id": np.arange(4)}, schema)
    assert _address(batch.column(1)) == values.ctypes.data
    back = kd.from_record_batch(batch, schema)["tokens"]
    assert back.values.ctypes.data == values.ctypes.data
    assert back.equals(ragged)
    assert back.lengths.tolist() == [2, 0, 5, 3]


def test_sliced_batches_read_back_the_right_rows_without_copying():
    feats = np.arange(60, dtype=np.float64).reshape(10, 6)
    seqs = [np.full((i % 3 + 1, 2), i, dtype=np.int32) for i in range(10)]
    schema = kd.Schema.from_arrays({"feats": feats, "seq": seqs})
    batch = kd.to_record_batch({"feats": feats, "seq": seqs}, schema, np.arange(10))
    part = kd.from_record_batch(batch.slice(3, 4), schema)
    np.testing.assert_array_equal(part[kd.SAMPLE_ID], [3, 4, 5, 6])
    np.testing.assert_array_equal(part["feats"], feats[3:7])
    assert part["feats"].ctypes.data == feats[3:].ctypes.data
    for got, want in zip(part["seq"], seqs[3:7], strict=True):
        np.testing.assert_array_equal(got, want)


def test_padded_input_and_padded_output():
    padded = np.array([[1, 2, 0], [3, 0, 0], [4, 5, 6]], dtype=np.float32)
    ragged = kd.Ragged.from_padded(padded, [2, 1, 3])
    schema = kd.Schema([kd.Field("t", "float32", (None,))])
    back = kd.from_record_batch(kd.to_record_batch({"t": ragged}, schema, [0, 1, 2]), schema)
    np.testing.assert_array_equal(back["t"].to_padded(), padded)
    assert [s.tolist() for s in back["t"]] == [[1, 2], [3], [4, 5, 6]]


def test_empty_sequences_and_empty_batches():
    schema = kd.Schema([kd.Field("t", "float32", (None, 2)), kd.Field("y", "int64")])
    batch = kd.to_record_batch({"t": [], "y": np.zeros(0, np.int64)}, schema, np.zeros(0, int))
    assert batch.num_rows == 0
    back = kd.from_record_batch(batch, schema)
    assert len(back["t"]) == 0 and back["y"].shape == (0,)


def test_bool_fields_round_trip():
    mask = np.array([[True, False], [False, False], [True, True]])
    schema = kd.Schema.from_arrays({"mask": mask})
    back = kd.from_record_batch(kd.to_record_batch({"mask": mask}, schema, [0, 1, 2]), schema)
    np.testing.assert_array_equal(back["mask"], mask)


def test_same_kind_dtypes_are_cast_other_kinds_refused():
    schema = kd.Schema([kd.Field("x", "float32", (2,))])
    batch = kd.to_record_batch({"x": np.ones((3, 2), np.float64)}, schema, [0, 1, 2])
    assert batch.column(1).type.value_type == pa.float32()
    with pytest.raises(kd.SchemaError, match=r"field 'x' is float32, got complex128"):
        kd.to_record_batch({"x": np.ones((3, 2), np.complex128)}, schema, [0, 1, 2])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"x": np.ones((3, 2)), "extra": np.ones(3)}, r"unknown field\(s\) \['extra'\]"),
        ({}, r"lacks field\(s\) \['x'\]"),
        ({"x": np.ones((3, 5))}, r"field 'x': each sample must have shape \(2,\), got \(5,\)"),
        ({"x": np.ones((4, 2))}, r"field 'x' has 4 samples but the batch has 3 sample ids"),
        ({"x": [np.ones(2)] * 3}, r"field 'x' has fixed shape \(2,\); give one ndarray"),
    ],
)
def test_bad_batches_name_the_field_and_the_fix(data, message):
    schema = kd.Schema([kd.Field("x", "float32", (2,))])
    with pytest.raises(kd.SchemaError, match=message):
        kd.to_record_batch(data, schema, [0, 1, 2])


def test_missing_or_bad_sample_ids():
    schema = kd.Schema([kd.Field("x", "float32")])
    with pytest.raises(kd.SchemaError, match="pass sample_ids= or add a 'sample_id'"):
        kd.to_record_batch({"x": np.ones(3)}, schema)
    with pytest.raises(kd.SchemaError, match="1-D integer array"):
        kd.to_record_batch({"x": np.ones(3)}, schema, np.ones(3))


def test_sequence_field_rejects_fixed_array():
    schema = kd.Schema([kd.Field("t", "float32", (None, 2))])
    with pytest.raises(kd.SchemaError, match="is a sequence field; give a list of arrays"):
        kd.to_record_batch({"t": np.ones((3, 4, 2))}, schema, [0, 1, 2])
    with pytest.raises(kd.SchemaError, match=r"each step must have shape \(2,\)"):
        kd.to_record_batch({"t": [np.ones((4, 3))] * 3}, schema, [0, 1, 2])


def test_reading_with_a_mismatched_schema_is_refused():
    schema = kd.Schema([kd.Field("x", "float32", (2,))])
    batch = kd.to_record_batch({"x": np.ones((3, 2))}, schema, [0, 1, 2])
    other = kd.Schema([kd.Field("x", "float32", (3,))])
    with pytest.raises(kd.SchemaError, match="arrived as"):
        kd.from_record_batch(batch, other)
    with pytest.raises(kd.SchemaError, match="expects"):
        kd.from_record_batch(batch, kd.Schema([kd.Field("y", "float32", (2,))]))


def test_nulls_from_foreign_tools_are_refused():
    arrow_schema = pa.schema([pa.field("sample_id", pa.int64()), pa.field("x", pa.float32())])
    batch = pa.record_batch([pa.array([0, 1]), pa.array([1.0, None], pa.float32())], arrow_schema)
    with pytest.raises(kd.SchemaError, match="null values"):
        kd.from_record_batch(batch)


def test_batches_survive_arrow_ipc():
    rng = np.random.default_rng(1)
    data = {
        "a": rng.normal(size=(5, 3)).astype(np.float32),
        "s": [np.ones((i, 2)) for i in range(5)],
    }
    schema = kd.Schema.from_arrays(data, codecs={"a": "fp16"})
    batch = kd.to_record_batch(data, schema, np.arange(5))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    read = pa.ipc.open_stream(sink.getvalue()).read_next_batch()
    back = kd.from_record_batch(read)  # schema recovered from the Arrow metadata alone
    np.testing.assert_allclose(back["a"], data["a"], rtol=2**-11)
    assert back["a"].dtype == np.float32
    assert all(np.array_equal(g, w) for g, w in zip(back["s"], data["s"], strict=True))


_DTYPES = st.sampled_from([np.float32, np.float64, np.int8, np.uint16, np.int64, np.float16])
_SHAPES = st.tuples(
    st.integers(0, 6), hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4)
).map(lambda s: (s[0], *s[1]))


@settings(max_examples=40, deadline=None)
@given(arrays=hnp.arrays(dtype=_DTYPES, shape=_SHAPES))
def test_any_numeric_tensor_round_trips_exactly(arrays):
    schema = kd.Schema.from_arrays({"x": arrays})
    ids = np.arange(len(arrays))
    back = kd.from_record_batch(kd.to_record_batch({"x": arrays}, schema, ids), schema)
    assert back["x"].dtype == arrays.dtype and back["x"].shape == arrays.shape
    np.testing.assert_array_equal(back["x"], arrays)


def test_reading_knowledge_never_imports_pandas():
    """pyarrow imports pandas (~0.2 s, holding the GIL) on a process's first
    Array.to_numpy; kdserve reads ids and values without it, so no stream stalls."""
    code = """
import sys, numpy as np, kdserve as kd
s = kd.Schema([kd.Field("x", "float32", (3,), codec="fp16"), kd.Field("n", "int16", ())])
data = {"x": np.ones((4, 3), np.float32), "n": np.arange(4, dtype=np.int16)}
out = kd.from_record_batch(kd.to_record_batch(data, s, np.arange(4)), s)
assert out["sample_id"].tolist() == [0, 1, 2, 3] and out["n"].tolist() == [0, 1, 2, 3]
assert not out["sample_id"].flags.writeable
assert "pandas" not in sys.modules, "pandas was imported"
"""
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "field",
    [
        kd.Field("logits", "float32", (12,), codec=kd.TopK(3)),
        kd.Field("logits", "float32", (None, 12), codec=kd.TopK(3)),
        kd.Field("emb", "float32", (4,), codec="fp16"),
    ],
)
def test_a_field_given_as_its_codecs_components_is_stored_as_is(field):
    schema = kd.Schema([field])
    rng = np.random.default_rng(0)
    if field.is_sequence:
        value = [rng.standard_normal((n, 12)).astype(np.float32) for n in (2, 0, 5)]
    else:
        value = rng.standard_normal((3, *field.shape)).astype(np.float32)
    encoded = kd.to_record_batch({field.name: value}, schema, np.arange(3))
    parts = kd.from_record_batch(encoded, decode=False)[field.name]
    again = kd.to_record_batch({field.name: parts}, schema, np.arange(3))
    assert again.equals(encoded)


def test_components_are_checked():
    schema = kd.Schema([kd.Field("logits", "float32", (12,), codec=kd.TopK(3))])
    ok = {
        "values": np.zeros((2, 3), np.float32),
        "indices": np.zeros((2, 3), np.uint16),
        "tail": np.zeros(2, np.float32),
    }
    with pytest.raises(
        kd.SchemaError, match=r"takes the components \['values', 'indices', 'tail'\]"
    ):
        kd.to_record_batch({"logits": {"values": ok["values"]}}, schema, np.arange(2))
    with pytest.raises(kd.SchemaError, match=r"'values' \(2, 3\) and 'indices' \(2, 4\)"):
        bad = {**ok, "indices": np.zeros((2, 4), np.uint16)}
        kd.to_record_batch({"logits": bad}, schema, np.arange(2))
    with pytest.raises(kd.SchemaError, match=r"the indices integers \(got float32\)"):
        bad = {**ok, "indices": np.zeros((2, 3), np.float32)}
        kd.to_record_batch({"logits": bad}, schema, np.arange(2))
    with pytest.raises(kd.SchemaError, match=r"component 'indices' must be uint16"):
        bad = {**ok, "indices": np.zeros((2, 3), np.int64)}
        kd.to_record_batch({"logits": bad}, schema, np.arange(2))
    with pytest.raises(kd.SchemaError, match="has 2 samples but the batch has 3"):
        kd.to_record_batch({"logits": ok}, schema, np.arange(3))
    plain = kd.Schema([kd.Field("x", "float32", (3,))])
    with pytest.raises(kd.SchemaError, match="has no codec"):
        kd.to_record_batch({"x": {"data": np.zeros((2, 3))}}, plain, np.arange(2))
