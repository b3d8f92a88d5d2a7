"""Knowledge batches: ``dict[str, ndarray]`` <-> Arrow ``RecordBatch``, zero-copy where possible.

Numeric data of C-contiguous arrays is wrapped, not copied, in both directions: the
Arrow buffers of a batch built here point at the caller's arrays, and arrays read back
are read-only views of the Arrow buffers. Codecs are applied on the way in and undone
on the way out. Sequence fields are :class:`~kdserve.core.ragged.Ragged` values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from kdserve.core.half import astype
from kdserve.core.ragged import Ragged
from kdserve.core.schema import SAMPLE_ID, Field, Schema
from kdserve.errors import SchemaError

__all__ = ["Knowledge", "concat_batches", "from_record_batch", "to_record_batch"]

Knowledge = dict[str, Any]
"""A batch as users see it: field name -> ndarray (first axis = samples) or Ragged."""


def to_record_batch(
    data: Mapping[str, Any], schema: Schema, sample_ids: Any = None
) -> pa.RecordBatch:
    """Validate ``data`` against ``schema``, apply codecs and wrap it as an Arrow batch.

    Sample ids come from ``sample_ids`` or ``data["sample_id"]``. Fields must match the
    schema by name, shape and dtype; a dtype of the same kind (float64 for float32) is
    cast, anything else is refused.
    """
    if sample_ids is None:
        if SAMPLE_ID not in data:
            raise SchemaError(
                f"the batch has no {SAMPLE_ID!r}; pass sample_ids= or add a "
                f"{SAMPLE_ID!r} array (one int per sample)",
                field=SAMPLE_ID,
            )
        sample_ids = data[SAMPLE_ID]
    unknown = sorted(set(data) - {SAMPLE_ID} - set(schema.names))
    if unknown:
        raise SchemaError(
            f"unknown field(s) {unknown}; the schema has {schema.names}. Add them to the "
            f"schema or drop them from the batch",
            field=unknown[0],
        )
    missing = [n for n in schema.names if n not in data]
    if missing:
        raise SchemaError(f"the batch lacks field(s) {missing} of the schema", field=missing[0])
    ids = _sample_ids(sample_ids)
    columns = [pa.Array.from_buffers(pa.int64(), len(ids), [None, pa.py_buffer(ids)])]
    for f in schema:
        columns.append(_field_to_arrow(f, data[f.name], len(ids)))
    return pa.RecordBatch.from_arrays(columns, schema=schema.to_arrow())


def from_record_batch(
    batch: pa.RecordBatch, schema: Schema | None = None, *, decode: bool = True
) -> Knowledge:
    """Read an Arrow batch back into arrays (``sample_id`` included), undoing codecs.

    With ``decode=False`` a coded field comes back as a dict of its codec's components.
    """
    schema = Schema.from_arrow(batch.schema) if schema is None else schema
    names = batch.schema.names
    expected = [SAMPLE_ID, *schema.names]
    if names != expected:
        raise SchemaError(f"the batch has columns {names}, but the schema expects {expected}")
    out: Knowledge = {SAMPLE_ID: _primitive_to_numpy(SAMPLE_ID, batch.column(0))}
    for i, f in enumerate(schema, start=1):
        column = batch.column(i)
        if column.type != f.arrow_type():
            raise SchemaError(
                f"field {f.name!r} arrived as {column.type}, but its schema says "
                f"{f.arrow_type()}; the producer and the schema disagree",
                field=f.name,
            )
        out[f.name] = _field_from_arrow(f, column, decode)
    return out


def concat_batches(batches: Sequence[pa.RecordBatch]) -> pa.RecordBatch:
    """One batch holding the rows of ``batches`` in order (copies only when there are several)."""
    if len(batches) == 1:
        return batches[0]
    return pa.concat_batches(batches)


def _sample_ids(value: Any) -> np.ndarray:
    ids = np.asarray(value)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise SchemaError(
            f"{SAMPLE_ID} must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}",
            field=SAMPLE_ID,
        )
    return np.ascontiguousarray(ids, dtype=np.int64)


def _field_to_arrow(f: Field, value: Any, n: int) -> pa.Array:
    if isinstance(value, Mapping):
        return _coded_to_arrow(f, value, n)
    if f.is_sequence:
        ragged = _as_ragged(f, value)
        _check_length(f, len(ragged), n)
        rows = _check_rows(f, ragged.values, "each step")
        offsets = ragged.offsets
        if offsets[-1] > np.iinfo(np.int32).max:
            raise SchemaError(f"field {f.name!r} has over 2**31 steps in one batch; split it")
        arrow_offsets = pa.py_buffer(np.ascontiguousarray(offsets, dtype=np.int32))
        row_array = _rows_to_arrow(f, rows)
        return pa.ListArray.from_buffers(
            pa.list_(row_array.type), n, [None, arrow_offsets], children=[row_array]
        )
    if isinstance(value, (Ragged, list, tuple)):
        raise SchemaError(
            f"field {f.name!r} has fixed shape {f.shape}; give one ndarray of shape "
            f"(batch, *{f.shape}), not {type(value).__name__}",
            field=f.name,
        )
    rows = _check_rows(f, np.asarray(value), "each sample")
    _check_length(f, len(rows), n)
    return _rows_to_arrow(f, rows)


def _as_ragged(f: Field, value: Any) -> Ragged:
    if isinstance(value, Ragged):
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            return Ragged(np.empty((0, *f.inner_shape), f.dtype), np.zeros(1, np.int64))
        return Ragged.from_list(value)
    raise SchemaError(
        f"field {f.name!r} is a sequence field; give a list of arrays or a Ragged "
        f"(Ragged.from_padded(padded, lengths) for padded input), not {type(value).__name__}",
        field=f.name,
    )


def _check_length(f: Field, length: int, n: int) -> None:
    if length != n:
        raise SchemaError(
            f"field {f.name!r} has {length} samples but the batch has {n} sample ids",
            field=f.name,
        )


def _check_rows(f: Field, rows: np.ndarray, what: str) -> np.ndarray:
    if rows.ndim == 0 or rows.shape[1:] != f.inner_shape:
        hint = ""
        if rows.ndim >= 2 and f.inner_shape and rows.shape[2:] == f.inner_shape[1:]:
            hint = (  # a padded sequence whose length changed from batch to batch
                f"; sequences of varying length are given as a kd.Ragged, a list of arrays, "
                f"or (from a program) padded with {f.name}_lengths or {f.name}_mask beside it"
            )
        raise SchemaError(
            f"field {f.name!r}: {what} must have shape {f.inner_shape}, got "
            f"{rows.shape[1:] if rows.ndim else 'a scalar'} (array shape {rows.shape}){hint}",
            field=f.name,
        )
    if rows.dtype != f.dtype:
        if not np.can_cast(rows.dtype, f.dtype, casting="same_kind"):
            raise SchemaError(
                f"field {f.name!r} is {f.dtype}, got {rows.dtype}; cast it or change the "
                f"field's dtype",
                field=f.name,
            )
        wide = rows
        with np.errstate(over="ignore"):
            rows = astype(wide, f.dtype)
        if rows.dtype.kind == "f" and wide.dtype.kind in "iu":
            _refuse_inexact(f, wide, rows)
        elif rows.dtype.kind == "f" and rows.dtype.itemsize < wide.dtype.itemsize:
            _refuse_overflow(f, wide, rows)
    return rows


def _refuse_inexact(f: Field, ints: np.ndarray, rows: np.ndarray) -> None:
    """SchemaError if integers given for a float field changed (beyond 2**24 for float32,
    2048 for float16): stored, they would silently be other numbers."""
    with np.errstate(invalid="ignore"):
        changed = rows.astype(ints.dtype) != ints
    changed |= ~np.isfinite(rows)
    if changed.any():
        raise SchemaError(
            f"field {f.name!r} is {f.dtype}, got {ints.dtype} values it cannot hold exactly "
            f"(e.g. {ints[changed].flat[0].item()!r} would be stored as "
            f"{rows[changed].flat[0].item()!r}); "
            f"return {f.dtype} values, or declare the field {ints.dtype}",
            field=f.name,
        )


def _refuse_overflow(f: Field, wide: np.ndarray, rows: np.ndarray) -> None:
    """SchemaError if narrowing ``wide`` to ``rows`` turned finite values into inf. One
    sum over ``rows`` first: only if it is not finite are the values looked at."""
    with np.errstate(all="ignore"):
        if np.isfinite(np.add.reduce(rows, axis=None)):
            return
        overflow = np.isinf(rows) & np.isfinite(wide)
        if overflow.any():
            raise SchemaError(
                f"field {f.name!r} is {f.dtype}, got {wide.dtype} values beyond its range "
                f"(e.g. {wide[overflow].flat[0]!r}) that would become inf; scale them, or "
                f"declare the field {wide.dtype}",
                field=f.name,
            )


def _coded_to_arrow(f: Field, parts: Mapping[str, Any], n: int) -> pa.Array:
    """A field given already coded, as its codec's components (what ``decode=False``
    returns; e.g. top-k computed on the teacher's device): checked, then stored as is."""
    if f.codec is None:
        raise SchemaError(
            f"field {f.name!r} has no codec, so it takes arrays, not a dict of components",
            field=f.name,
        )
    layout = f.codec.layout(f.dtype, f.inner_shape)
    if set(parts) != set(layout):
        raise SchemaError(
            f"field {f.name!r} ({f.codec.name}) takes the components {list(layout)}, got "
            f"{sorted(parts)}",
            field=f.name,
        )
    offsets: np.ndarray | None = None
    given: dict[str, np.ndarray] = {}
    for name in layout:
        value = parts[name]
        if f.is_sequence:
            ragged = _as_ragged(f, value)
            if offsets is not None and not np.array_equal(offsets, ragged.offsets):
                raise SchemaError(
                    f"field {f.name!r}: the components' sequences differ in length",
                    field=f.name,
                )
            offsets, value = ragged.offsets, ragged.values
        given[name] = np.asarray(value)
    rows = f.codec.from_compact(given, f.name, f.inner_shape)
    for name, (dtype, shape) in layout.items():
        array = rows[name]
        if array.shape[1:] != shape or not np.can_cast(array.dtype, dtype, "same_kind"):
            raise SchemaError(
                f"field {f.name!r}: component {name!r} must be {dtype} of shape (rows, *{shape}), "
                f"got {array.dtype} {array.shape}",
                field=f.name,
            )
        rows[name] = array.astype(dtype, copy=False)
    struct = _parts_to_arrow(rows)
    if offsets is None:
        _check_length(f, len(struct), n)
        return struct
    _check_length(f, len(offsets) - 1, n)
    arrow_offsets = pa.py_buffer(np.ascontiguousarray(offsets, dtype=np.int32))
    return pa.ListArray.from_buffers(
        pa.list_(struct.type), n, [None, arrow_offsets], children=[struct]
    )


def _rows_to_arrow(f: Field, rows: np.ndarray) -> pa.Array:
    parts = {"data": rows} if f.codec is None else f.codec.encode(rows, f.name)
    return _parts_to_arrow(parts)


def _parts_to_arrow(parts: Mapping[str, np.ndarray]) -> pa.Array:
    arrays = [_tensor_to_arrow(p) for p in parts.values()]
    if len(arrays) == 1:
        return arrays[0]
    return pa.StructArray.from_arrays(arrays, names=list(parts))


def _tensor_to_arrow(arr: np.ndarray) -> pa.Array:
    """Wrap ``(n, *shape)`` as nested fixed-size lists over the array's own buffer."""
    arr = np.ascontiguousarray(arr)
    flat = arr.reshape(-1)
    if arr.dtype == np.bool_:
        values = pa.array(flat)  # Arrow packs booleans into bits: a copy is unavoidable.
    else:
        values = pa.Array.from_buffers(
            pa.from_numpy_dtype(arr.dtype), flat.size, [None, pa.py_buffer(flat)]
        )
    for d in reversed(arr.shape[1:]):
        values = pa.FixedSizeListArray.from_arrays(values, d)
    return values


def _field_from_arrow(f: Field, column: pa.Array, decode: bool) -> Any:
    if f.is_sequence:
        offsets = _primitive_to_numpy(f.name, column.offsets)
        rows_array = column.values.slice(offsets[0], offsets[-1] - offsets[0])
        rows = _rows_from_arrow(f, rows_array, decode)
        relative = offsets - offsets[0] if offsets[0] else offsets
        if isinstance(rows, dict):
            return {k: Ragged(v, relative) for k, v in rows.items()}
        return Ragged(rows, relative)
    return _rows_from_arrow(f, column, decode)


def _rows_from_arrow(f: Field, array: pa.Array, decode: bool) -> Any:
    layout = f.layout()
    children = [array] if len(layout) == 1 else array.flatten()
    parts = {
        name: _tensor_from_arrow(f.name, child, shape)
        for (name, (_, shape)), child in zip(layout.items(), children, strict=True)
    }
    if f.codec is None:
        return parts["data"]
    if not decode:
        return f.codec.to_compact(parts)
    return f.codec.decode(parts, f.dtype, f.inner_shape)


def _tensor_from_arrow(name: str, array: pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    n = len(array)
    for _ in shape:
        array = array.flatten()
    return _primitive_to_numpy(name, array).reshape(n, *shape)


def _primitive_to_numpy(name: str, array: pa.Array) -> np.ndarray:
    if array.null_count:
        raise SchemaError(
            f"field {name!r} holds {array.null_count} null values; knowledge cannot have nulls "
            f"(was the data edited by another tool?)",
            field=name,
        )
    t = array.type
    if pa.types.is_boolean(t):  # bits, not bytes: a copy is unavoidable
        result: np.ndarray = array.to_numpy(zero_copy_only=False)
        return result
    kind = "f" if pa.types.is_floating(t) else "i" if pa.types.is_signed_integer(t) else "u"
    dtype = np.dtype(f"<{kind}{t.bit_width // 8}")
    # A view of the values buffer: no copy, and not Array.to_numpy, whose first call in a
    # process imports pandas (~0.2 s holding the GIL, mid-stream).
    view = np.frombuffer(
        array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize
    )
    view.flags.writeable = False  # Arrow memory is shared (a store's mmap, a received batch)
    return view


def sample_ids(batch: pa.RecordBatch) -> np.ndarray:
    """A knowledge batch's sample ids (its first column), as a read-only int64 view."""
    return _primitive_to_numpy(SAMPLE_ID, batch.column(0))
