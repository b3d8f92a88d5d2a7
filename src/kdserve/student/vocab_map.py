"""Vocabulary maps: the explicit mapping that lets a student read a teacher whose tokenizer
differs from its own.

A :class:`VocabMap` gives, for each of a teacher's token ids, the student's id of the same
token (``ids[t]``), and the student's vocabulary size. Registered with a teacher
(``Student.add_store(path, vocab_map=...)``, ``add_teacher(address, vocab_map=...)``), it
rewrites the ``indices`` component of that teacher's :class:`~kdserve.TopK` fields into
the student's ids, so that the field is top-k over the student's vocabulary: compact
(``decode=False``) indices are the student's, and decoding spreads the tail mass over the
student's other ``vocab_size - k`` tokens. Such a teacher is then taken to speak the
student's vocabulary: its recorded ``tokenizer`` and ``vocab_size`` are neither refused
beside other teachers' nor compared with ``Student(expect=...)`` (its map's
``vocab_size`` is, as its ``vocab_size``).

Only top-k indices can be rewritten: a dense field (or an fp16/int8-coded one) as wide as
the teacher's vocabulary would stay in the teacher's vocabulary, and is refused. The map
is one to one: every teacher token needs its own student token (a token without a
counterpart cannot move its probability into the tail without changing ``k``), so two
teacher tokens on one student token, or none, are refused. Other fields pass unchanged:
token ids a teacher kept (an integer sequence field) stay the teacher's ids.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdserve.core.batch import Knowledge, from_record_batch
from kdserve.core.codecs import TopK
from kdserve.core.schema import SAMPLE_ID, Field, Schema
from kdserve.errors import SchemaError

__all__ = ["VocabMap"]


class VocabMap:
    """Teacher token ``t`` is the student's token ``ids[t]``; the student's vocabulary has
    ``vocab_size`` tokens. ``ids`` is a 1-D integer array as long as the teacher's
    vocabulary, its values distinct and in ``[0, vocab_size)``; anything else is refused
    here, naming the first bad entry.

    ``VocabMap(np.array([2, 0, 1]), vocab_size=4)``: the teacher's tokens 0, 1, 2 are the
    student's 2, 0, 1 (the student's token 3 has no teacher counterpart).
    """

    def __init__(self, ids: Any, vocab_size: int) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
            raise TypeError(f"VocabMap vocab_size must be an int, got {vocab_size!r}")
        if vocab_size < 1:
            raise ValueError(f"VocabMap vocab_size must be >= 1, got {vocab_size}")
        array = np.asarray(ids)
        if array.dtype.kind not in "iu":
            raise TypeError(
                f"VocabMap ids must be integer token ids, got dtype {array.dtype}; "
                f"ids[t] is the student's id of the teacher's token t"
            )
        if array.ndim != 1 or len(array) == 0:
            raise ValueError(
                f"VocabMap ids must be a non-empty 1-D array, one entry per teacher token, "
                f"got shape {array.shape}"
            )
        outside = np.flatnonzero((array < 0) | (array >= vocab_size))
        if len(outside):
            t = int(outside[0])
            raise ValueError(
                f"VocabMap maps teacher token {t} to {int(array[t])}, outside the student's "
                f"vocabulary [0, {int(vocab_size)}) ({len(outside)} such entries): every "
                f"teacher token needs a student token"
            )
        order = np.argsort(array, kind="stable")
        same = np.flatnonzero(array[order][1:] == array[order][:-1])
        if len(same):
            a, b = (int(t) for t in order[same[0] : same[0] + 2])
            raise ValueError(
                f"VocabMap maps teacher tokens {a} and {b} both to student token "
                f"{int(array[a])} ({len(same)} repeated student tokens): their top-k entries "
                f"would collide; map each teacher token to a token of its own"
            )
        self.ids = array.astype(np.int64)
        self.ids.flags.writeable = False
        self.vocab_size = int(vocab_size)
        self._tables: dict[np.dtype[Any], pa.Array] = {}  # ids as Arrow, by index dtype

    def __len__(self) -> int:
        """The teacher's vocabulary size."""
        return len(self.ids)

    def __repr__(self) -> str:
        return f"VocabMap(<{len(self)} teacher tokens>, vocab_size={self.vocab_size})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VocabMap):
            return NotImplemented
        return self.vocab_size == other.vocab_size and np.array_equal(self.ids, other.ids)

    __hash__ = None  # type: ignore[assignment]  # it holds an array

    def schema(self, schema: Schema, teacher: str) -> Schema:
        """``schema`` (teacher ``teacher``'s) as the student receives it: each TopK field over
        the student's vocabulary. SchemaError, naming the field, unless every TopK field is
        as wide as the map and no other field is."""
        fields: list[Field] = []
        for f in schema:
            width = f.inner_shape[-1] if f.inner_shape else None
            if isinstance(f.codec, TopK):
                if width != len(self):
                    raise SchemaError(
                        f"teacher {teacher!r}'s field {f.name!r} is top-{f.codec.k} over "
                        f"{width} entries, but its vocab_map maps {len(self)} token ids; give "
                        f"the map of this teacher's vocabulary",
                        field=f.name,
                    )
                shape = (*f.shape[:-1], self.vocab_size)
                fields.append(Field(f.name, f.dtype, shape, f.codec))
            elif width == len(self):
                raise SchemaError(
                    f"teacher {teacher!r}'s field {f.name!r} has {width} entries per row, as "
                    f"many as its vocabulary, but is not TopK-coded: vocab_map rewrites the "
                    f"indices of TopK fields only, and this one would stay in the teacher's "
                    f"vocabulary. Store it with codec=kd.TopK(k), or leave it out (keep=)",
                    field=f.name,
                )
            else:
                fields.append(f)
        if not any(isinstance(f.codec, TopK) for f in schema):
            raise SchemaError(
                f"teacher {teacher!r} has no TopK field for its vocab_map to rewrite (fields "
                f"{schema.names}); register it without vocab_map="
            )
        return Schema(fields, schema.metadata)

    def knowledge(
        self, batch: pa.RecordBatch, schema: Schema, decode: bool, teacher: str
    ) -> Knowledge:
        """A batch of teacher ``teacher`` (of ``schema``) read as
        :func:`~kdserve.from_record_batch` reads it, its TopK indices the student's."""
        mapped = self.schema(schema, teacher)
        if batch.schema.names != [SAMPLE_ID, *schema.names] or any(
            batch.column(i).type != f.arrow_type() for i, f in enumerate(schema, start=1)
        ):
            return from_record_batch(batch, schema)  # raises the SchemaError that says why
        columns = [batch.column(0)]
        for i, (f, m) in enumerate(zip(schema, mapped, strict=True), start=1):
            columns.append(self._column(batch.column(i), m) if m is not f else batch.column(i))
        out = pa.RecordBatch.from_arrays(columns, names=batch.schema.names)
        return from_record_batch(out, mapped, decode=decode)

    def _column(self, column: pa.Array, field: Field) -> pa.Array:
        """A TopK column with its indices in the student's ids (of ``field``'s type)."""
        dtype = field.layout()["indices"][0]
        table = self._tables.get(dtype)
        if table is None:
            table = self._tables[dtype] = pa.array(self.ids.astype(dtype))
        if field.is_sequence:
            steps = self._rows(column.values, table)
            return pa.ListArray.from_arrays(column.offsets, steps, type=field.arrow_type())
        return self._rows(column, table)

    @staticmethod
    def _rows(rows: pa.StructArray, table: pa.Array) -> pa.StructArray:
        """Struct rows of TopK components, their ``indices`` taken from ``table``."""
        names = [rows.type.field(i).name for i in range(rows.type.num_fields)]
        parts = rows.flatten()
        at = names.index("indices")
        parts[at] = _taken(parts[at], table)
        return pa.StructArray.from_arrays(parts, names=names)


def _taken(array: pa.Array, table: pa.Array) -> pa.Array:
    """``array`` (nested fixed-size lists of ids) with each id ``t`` replaced by ``table[t]``."""
    if pa.types.is_fixed_size_list(array.type):
        inner = _taken(array.flatten(), table)
        return pa.FixedSizeListArray.from_arrays(inner, array.type.list_size)
    return pc.take(table, array)
