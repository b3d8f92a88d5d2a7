"""Schema: declared or inferred fields, Arrow and JSON round trips, Pantheon's desc."""

import numpy as np
import pyarrow as pa
import pytest

import kdserve as kd


def _schema():
    return kd.Schema(
        [
            kd.Field("logits", "float32", (10,), codec="fp16"),
            kd.Field("tokens", np.float32, (None, 4), codec={"name": "topk", "k": 2}),
            kd.Field("label", "int64"),
        ],
        metadata={"teacher": "resnet", "model": "r50"},
    )


def test_arrow_round_trip_keeps_fields_codecs_and_metadata():
    schema = _schema()
    arrow = schema.to_arrow()
    assert arrow.names == ["sample_id", "logits", "tokens", "label"]
    assert arrow.field("sample_id").type == pa.int64()
    assert arrow.field("logits").type == pa.list_(pa.float16(), 10)
    assert pa.types.is_list(arrow.field("tokens").type)
    assert kd.Schema.from_arrow(arrow) == schema


def test_json_round_trip():
    schema = _schema()
    assert kd.Schema.from_json(schema.to_json()) == schema


def test_describe_is_pantheon_style():
    desc = _schema().describe()
    assert desc["label"] == {"shape": [-1], "dtype": "int64", "lod_level": 0}
    assert desc["tokens"]["shape"] == [-1, -1, 4]
    assert desc["tokens"]["lod_level"] == 1
    assert desc["logits"]["codec"] == {"name": "fp16"}


def test_infer_from_arrays():
    data = {
        "sample_id": np.arange(3),
        "logits": np.zeros((3, 5, 7), np.float16),
        "seq": [np.zeros((2, 3)), np.zeros((1, 3)), np.zeros((4, 3))],
        "ragged": kd.Ragged(np.zeros(6, np.int32), np.array([0, 1, 3, 6])),
    }
    schema = kd.Schema.from_arrays(data, codecs={"logits": "bf16"})
    assert schema.names == ["logits", "seq", "ragged"]
    assert schema["logits"].shape == (5, 7) and schema["logits"].codec == kd.Bf16()
    assert schema["seq"].shape == (None, 3) and schema["seq"].dtype == np.float64
    assert schema["ragged"].shape == (None,) and schema["ragged"].lod_level == 1


def test_plain_arrow_columns_are_inferred():
    arrow = pa.schema(
        [
            ("sample_id", pa.int64()),
            ("emb", pa.list_(pa.list_(pa.float32(), 3), 2)),
            ("seq", pa.list_(pa.int16())),
        ]
    )
    schema = kd.Schema.from_arrow(arrow)
    assert schema["emb"].shape == (2, 3) and schema["emb"].dtype == np.float32
    assert schema["seq"].shape == (None,) and schema["seq"].dtype == np.int16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("sample_id", "int64"), "reserved for the sample id column"),
        (("", "float32"), "non-empty string"),
        (("x", "U5"), "must be bool, integer or float"),
        (("x", "not-a-dtype"), "is not a dtype"),
        (("x", "float32", (3, None)), "only the first may be None"),
        (("x", "float32", (0,)), "ints >= 1"),
        (("x", "int32", (4,), "fp16"), "applies to float fields"),
        (("x", "float32", (4,), "zstd"), "unknown codec 'zstd'"),
    ],
)
def test_bad_fields_are_refused_with_the_reason(args, message):
    with pytest.raises(kd.SchemaError, match=message):
        kd.Field(*args)


def test_schema_level_errors():
    f = kd.Field("x", "float32")
    with pytest.raises(kd.SchemaError, match="appears twice"):
        kd.Schema([f, f])
    with pytest.raises(kd.SchemaError, match=r"no field 'y'; the schema has \['x'\]"):
        kd.Schema([f])["y"]
    with pytest.raises(kd.SchemaError, match="no 'sample_id' column"):
        kd.Schema.from_arrow(pa.schema([("x", pa.float32())]))
    with pytest.raises(kd.SchemaError, match="must be int64"):
        kd.Schema.from_arrow(pa.schema([("sample_id", pa.int32())]))
    with pytest.raises(kd.SchemaError, match="not a numeric tensor"):
        kd.Schema.from_arrow(pa.schema([("sample_id", pa.int64()), ("s", pa.string())]))
    with pytest.raises(kd.SchemaError, match="codecs given for fields not in the batch"):
        kd.Schema.from_arrays({"x": np.ones(2)}, codecs={"y": "fp16"})


def test_damaged_metadata_is_reported():
    field = kd.Field("x", "float32", (2,)).to_arrow()
    broken = field.with_metadata({**field.metadata, b"kdserve.shape": b"[2"})
    with pytest.raises(kd.SchemaError, match="unreadable kdserve metadata"):
        kd.Field.from_arrow(broken)
    mismatched = pa.field("x", pa.list_(pa.float32(), 3), metadata=field.metadata)
    with pytest.raises(kd.SchemaError, match="metadata calls for"):
        kd.Field.from_arrow(mismatched)


def test_select_with_codecs_with_metadata():
    schema = _schema()
    assert schema.select(["label", "logits"]).names == ["label", "logits"]
    assert schema.with_codecs({"logits": None})["logits"].codec is None
    assert schema.with_metadata(teacher="x").metadata["teacher"] == "x"
    with pytest.raises(kd.SchemaError):
        schema.with_codecs({"nope": "fp16"})
