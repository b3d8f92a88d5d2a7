"""Re-batching: property tests over arbitrary incoming batch sizes."""

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kdserve as kd
from kdserve.core.rebatch import Rebatcher, rebatch

SCHEMA = kd.Schema([kd.Field("x", "float32", (3,)), kd.Field("s", "int32", (None,))])


def _batches(sizes):
    start = 0
    for size in sizes:
        ids = np.arange(start, start + size)
        data = {
            "x": np.repeat(ids[:, None], 3, axis=1).astype(np.float32),
            "s": [np.full(i % 4, i, np.int32) for i in ids],
        }
        yield kd.to_record_batch(data, SCHEMA, ids)
        start += size


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), max_size=20),
    batch_size=st.integers(1, 50),
    drop_last=st.booleans(),
)
def test_rows_and_order_are_kept_and_batches_are_full(sizes, batch_size, drop_last):
    total = sum(sizes)
    out = list(rebatch(_batches(sizes), batch_size, drop_last))
    expected_rows = total - total % batch_size if drop_last else total
    ids = np.concatenate([b.column(0).to_numpy() for b in out]) if out else np.array([], int)
    np.testing.assert_array_equal(ids, np.arange(expected_rows))
    assert all(b.num_rows == batch_size for b in out[:-1])
    if out:
        assert 0 < out[-1].num_rows <= batch_size
        assert out[-1].num_rows == batch_size or not drop_last
    for b in out:  # every column moved with its row
        back = kd.from_record_batch(b, SCHEMA)
        np.testing.assert_array_equal(back["x"][:, 0], back[kd.SAMPLE_ID])
        assert [len(s) for s in back["s"]] == [i % 4 for i in back[kd.SAMPLE_ID]]


def test_batches_that_fit_are_sliced_not_copied():
    (big,) = _batches([10])
    out = list(rebatch([big], 5))
    base = big.column(1).values.buffers()[1].address
    for b in out:
        assert b.column(1).values.buffers()[1].address == base


def test_streaming_push_and_finish():
    rebatcher = Rebatcher(4)
    batches = list(_batches([3, 3, 3]))
    assert rebatcher.push(batches[0]) == []
    assert rebatcher.pending_rows == 3
    (first,) = rebatcher.push(batches[1])
    assert first.num_rows == 4 and rebatcher.pending_rows == 2
    (second,) = rebatcher.push(batches[2])
    assert second.num_rows == 4
    rest = rebatcher.finish()
    assert rest is not None and rest.num_rows == 1
    assert rebatcher.finish() is None and rebatcher.pending_rows == 0


def test_bad_batch_size_and_mixed_schemas():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            Rebatcher(bad)
    rebatcher = Rebatcher(4)
    rebatcher.push(next(_batches([2])))
    other = pa.record_batch([pa.array([1], pa.int64())], names=["sample_id"])
    with pytest.raises(kd.SchemaError, match="one stream must keep one schema"):
        rebatcher.push(other)
