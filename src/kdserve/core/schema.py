"""Knowledge schema: the fields a teacher produces, as a typed Arrow schema with kdserve metadata.

A field has a name, a dtype, a per-sample shape and an optional codec. A shape whose
first dimension is ``None`` is a variable-length sequence (Pantheon's ``lod_level`` 1).
In Arrow a per-sample tensor is a (nested) fixed-size list, a sequence a list of them,
and a codec's components a struct; every batch starts with an int64 ``sample_id``.
The field's own facts travel in Arrow field metadata under ``kdserve.*`` keys, so a
schema read back from a store or a Flight stream is the schema that was written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

from kdserve.core.codecs import Codec, Layout, codec_from_spec
from kdserve.core.ragged import Ragged
from kdserve.errors import SchemaError

__all__ = ["SAMPLE_ID", "Field", "Schema"]

SAMPLE_ID = "sample_id"
"""Name of the int64 column every knowledge batch carries; students align teachers on it."""

_META_DTYPE = b"kdserve.dtype"
_META_SHAPE = b"kdserve.shape"
_META_CODEC = b"kdserve.codec"
_NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float


@dataclass(frozen=True)
class Field:
    """One kind of knowledge: ``Field("logits", "float32", (1000,), codec="fp16")``.

    ``shape`` is per sample, without the batch axis; ``(None, 512)`` is a sequence of
    512-wide steps. ``dtype`` is what students receive, whatever the codec stores.
    """

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...] = ()
    codec: Codec | None = None

    def __init__(
        self,
        name: str,
        dtype: Any,
        shape: Sequence[int | None] = (),
        codec: str | Mapping[str, Any] | Codec | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise SchemaError(f"a field name must be a non-empty string, got {name!r}")
        if name == SAMPLE_ID:
            raise SchemaError(
                f"{SAMPLE_ID!r} is reserved for the sample id column; rename the field",
                field=name,
            )
        try:
            np_dtype = np.dtype(dtype)
        except TypeError:
            raise SchemaError(f"field {name!r}: {dtype!r} is not a dtype", field=name) from None
        if np_dtype.kind not in _NUMERIC_KINDS or (np_dtype.kind == "f" and np_dtype.itemsize > 8):
            raise SchemaError(
                f"field {name!r} has dtype {np_dtype}; knowledge must be bool, integer or float "
                f"(at most 64 bits: cast a long double to float64)",
                field=name,
            )
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable):
            raise SchemaError(
                f"field {name!r}: shape must be a tuple of dimensions, e.g. (3,), got {shape!r}",
                field=name,
            )
        dims = tuple(shape)
        for i, d in enumerate(dims):
            ok = (d is None and i == 0) or (isinstance(d, (int, np.integer)) and d >= 1)
            if not ok:
                raise SchemaError(
                    f"field {name!r} has shape {dims}: dimensions are ints >= 1, and only the "
                    f"first may be None (a variable-length sequence)",
                    field=name,
                )
        dims = tuple(None if d is None else int(d) for d in dims)
        resolved = codec_from_spec(codec)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", np_dtype.newbyteorder("="))
        object.__setattr__(self, "shape", dims)
        object.__setattr__(self, "codec", resolved)
        if resolved is not None:
            resolved.check(name, self.dtype, self.inner_shape)

    @property
    def is_sequence(self) -> bool:
        """True for a variable-length sequence field (first dimension ``None``)."""
        return bool(self.shape) and self.shape[0] is None

    @property
    def lod_level(self) -> int:
        """Pantheon's name for :attr:`is_sequence`: 1 for sequences, 0 otherwise."""
        return int(self.is_sequence)

    @property
    def inner_shape(self) -> tuple[int, ...]:
        """Shape of one row: a sample of a fixed field, one step of a sequence field."""
        dims = self.shape[1:] if self.is_sequence else self.shape
        return tuple(d for d in dims if d is not None)

    def layout(self) -> Layout:
        """The stored components: the codec's, or the raw values as one ``data`` component."""
        if self.codec is None:
            return {"data": (self.dtype, self.inner_shape)}
        return self.codec.layout(self.dtype, self.inner_shape)

    def with_codec(self, codec: str | Mapping[str, Any] | Codec | None) -> Field:
        return Field(self.name, self.dtype, self.shape, codec)

    def arrow_type(self) -> pa.DataType:
        """The Arrow type of this field's column (made once: a field never changes, and
        every batch asks)."""
        made: pa.DataType | None = self.__dict__.get("_arrow_type")
        if made is None:
            layout = self.layout().items()
            parts = {name: _tensor_type(dt, shape) for name, (dt, shape) in layout}
            row = next(iter(parts.values())) if len(parts) == 1 else pa.struct(parts)
            made = pa.list_(row) if self.is_sequence else row
            object.__setattr__(self, "_arrow_type", made)
        return made

    def to_arrow(self) -> pa.Field:
        meta = {
            _META_DTYPE: self.dtype.str.encode(),
            _META_SHAPE: json.dumps(list(self.shape)).encode(),
        }
        if self.codec is not None:
            meta[_META_CODEC] = json.dumps(self.codec.to_json()).encode()
        return pa.field(self.name, self.arrow_type(), nullable=False, metadata=meta)

    @classmethod
    def from_arrow(cls, arrow_field: pa.Field) -> Field:
        """Read a field written by :meth:`to_arrow`, or infer one from a plain Arrow field."""
        meta = arrow_field.metadata or {}
        if _META_DTYPE in meta:
            try:
                codec = json.loads(meta[_META_CODEC]) if _META_CODEC in meta else None
                result = cls(
                    arrow_field.name,
                    np.dtype(meta[_META_DTYPE].decode()),
                    json.loads(meta[_META_SHAPE]),
                    codec,
                )
            except (ValueError, TypeError, KeyError) as exc:
                raise SchemaError(
                    f"field {arrow_field.name!r} has unreadable kdserve metadata ({exc}); the "
                    f"schema was damaged or written by an incompatible kdserve",
                    field=arrow_field.name,
                ) from None
        else:
            dtype, shape = _infer_from_arrow_type(arrow_field.name, arrow_field.type)
            result = cls(arrow_field.name, dtype, shape)
        if result.arrow_type() != arrow_field.type:
            raise SchemaError(
                f"field {arrow_field.name!r} has Arrow type {arrow_field.type}, but its kdserve "
                f"metadata calls for {result.arrow_type()}",
                field=arrow_field.name,
            )
        return result

    def to_json(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"name": self.name, "dtype": self.dtype.name}
        spec["shape"] = list(self.shape)
        if self.codec is not None:
            spec["codec"] = self.codec.to_json()
        return spec

    def describe(self) -> dict[str, Any]:
        """Pantheon's desc: shape with -1 for the batch axis and variable dims."""
        shape = [-1] + [-1 if d is None else d for d in self.shape]
        desc: dict[str, Any] = {"shape": shape, "dtype": self.dtype.name}
        desc["lod_level"] = self.lod_level
        if self.codec is not None:
            desc["codec"] = self.codec.to_json()
        return desc


@dataclass(frozen=True)
class Schema:
    """The ordered knowledge fields of a stream, plus string metadata (teacher name, model)."""

    fields: tuple[Field, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __init__(self, fields: Iterable[Field], metadata: Mapping[str, str] | None = None):
        fields = tuple(fields)
        seen: set[str] = set()
        for f in fields:
            if not isinstance(f, Field):
                raise SchemaError(f"Schema takes Field objects, got {type(f).__name__}")
            if f.name in seen:
                raise SchemaError(f"field {f.name!r} appears twice in the schema", field=f.name)
            seen.add(f.name)
        meta = dict(metadata or {})
        for k, v in meta.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise SchemaError(f"schema metadata maps str to str, got {k!r}: {v!r}")
        object.__setattr__(self, "fields", fields)
        object.__setattr__(self, "metadata", meta)

    @classmethod
    def from_arrays(
        cls,
        data: Mapping[str, Any],
        codecs: Mapping[str, str | Mapping[str, Any] | Codec | None] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Schema:
        """Infer a schema from one example batch (``sample_id``, if present, is skipped).

        An ndarray gives a fixed-shape field (first axis = samples); a :class:`Ragged`
        or a list of arrays gives a sequence field.
        """
        codecs = dict(codecs or {})
        unknown = set(codecs) - set(data)
        if unknown:
            raise SchemaError(f"codecs given for fields not in the batch: {sorted(unknown)}")
        fields = []
        for name, value in data.items():
            if name == SAMPLE_ID:
                continue
            if isinstance(value, (list, tuple, Ragged)):
                ragged = value if isinstance(value, Ragged) else Ragged.from_list(value)
                shape = (None, *ragged.inner_shape)
                fields.append(Field(name, ragged.dtype, shape, codecs.get(name)))
                continue
            arr = np.asarray(value)
            if arr.ndim == 0:
                raise SchemaError(
                    f"field {name!r} is a scalar; give one value per sample (first axis = batch)",
                    field=name,
                )
            fields.append(Field(name, arr.dtype, arr.shape[1:], codecs.get(name)))
        return cls(fields, metadata)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def __getitem__(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise SchemaError(f"no field {name!r}; the schema has {self.names}", field=name)

    def __contains__(self, name: object) -> bool:
        return any(f.name == name for f in self.fields)

    def __iter__(self) -> Iterator[Field]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def select(self, names: Iterable[str]) -> Schema:
        """The schema of just ``names``, in that order."""
        return Schema([self[n] for n in names], self.metadata)

    def with_codecs(self, codecs: Mapping[str, str | Mapping[str, Any] | Codec | None]) -> Schema:
        """A copy with the codecs of the named fields replaced."""
        for name in codecs:
            self[name]  # raises SchemaError naming an unknown field
        return Schema(
            [f.with_codec(codecs[f.name]) if f.name in codecs else f for f in self.fields],
            self.metadata,
        )

    def with_metadata(self, **metadata: str) -> Schema:
        return replace(self, fields=self.fields, metadata={**self.metadata, **metadata})

    def to_arrow(self) -> pa.Schema:
        """The Arrow schema of a knowledge batch: ``sample_id`` then each field (made once:
        a schema never changes, and every batch asks)."""
        made: pa.Schema | None = self.__dict__.get("_arrow")
        if made is None:
            arrow_fields = [pa.field(SAMPLE_ID, pa.int64(), nullable=False)]
            arrow_fields += [f.to_arrow() for f in self.fields]
            meta = {f"kdserve.meta.{k}": v for k, v in self.metadata.items()}
            made = pa.schema(arrow_fields, metadata=meta)
            object.__setattr__(self, "_arrow", made)
        return made

    @classmethod
    def from_arrow(cls, arrow_schema: pa.Schema) -> Schema:
        if SAMPLE_ID not in arrow_schema.names:
            raise SchemaError(
                f"the Arrow schema has no {SAMPLE_ID!r} column; kdserve knowledge needs an "
                f"int64 sample id per row (columns: {arrow_schema.names})"
            )
        if arrow_schema.field(SAMPLE_ID).type != pa.int64():
            raise SchemaError(
                f"{SAMPLE_ID!r} must be int64, got {arrow_schema.field(SAMPLE_ID).type}",
                field=SAMPLE_ID,
            )
        fields = [Field.from_arrow(f) for f in arrow_schema if f.name != SAMPLE_ID]
        prefix = "kdserve.meta."
        meta = {
            k.decode()[len(prefix) :]: v.decode()
            for k, v in (arrow_schema.metadata or {}).items()
            if k.decode().startswith(prefix)
        }
        return cls(fields, meta)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready description that :meth:`from_json` reads back."""
        return {"fields": [f.to_json() for f in self.fields], "metadata": dict(self.metadata)}

    @classmethod
    def from_json(cls, spec: Mapping[str, Any]) -> Schema:
        try:
            fields = [
                Field(f["name"], f["dtype"], f["shape"], f.get("codec")) for f in spec["fields"]
            ]
            return cls(fields, spec.get("metadata", {}))
        except (KeyError, TypeError) as exc:
            raise SchemaError(f"not a kdserve schema description: missing or bad {exc}") from None

    def describe(self) -> dict[str, dict[str, Any]]:
        """Pantheon's ``get_knowledge_desc()``: ``{name: {"shape", "dtype", "lod_level"}}``."""
        return {f.name: f.describe() for f in self.fields}


def _tensor_type(dtype: np.dtype[Any], shape: tuple[int, ...]) -> pa.DataType:
    arrow = pa.from_numpy_dtype(dtype)
    for d in reversed(shape):
        arrow = pa.list_(arrow, d)
    return arrow


def _infer_from_arrow_type(name: str, arrow_type: pa.DataType) -> tuple[np.dtype[Any], list[Any]]:
    """dtype and shape of a plain (non-kdserve) Arrow column of nested lists of numbers."""
    shape: list[Any] = []
    t = arrow_type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        shape.append(None)
        t = t.value_type
    while pa.types.is_fixed_size_list(t):
        shape.append(t.list_size)
        t = t.value_type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise SchemaError(
            f"column {name!r} has Arrow type {arrow_type}, which is not a numeric tensor",
            field=name,
        )
    return np.dtype(t.to_pandas_dtype()), shape
