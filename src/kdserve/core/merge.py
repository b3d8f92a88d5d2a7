"""Merging several teachers' knowledge into one batch, aligned by sample id.

A field produced by one teacher passes through. A field produced by several needs a
strategy -- ``"sum"``, ``"mean"``, ``"max"``, ``"min"``, :class:`WeightedMean`,
:class:`Take` (one teacher's value) or any callable ``f({teacher: array}) -> array`` --
and without one the merge is refused, as in Pantheon. Rows are matched by ``sample_id``:
a teacher whose batch holds the same ids in another order is reordered; different ids
raise :class:`~kdserve.errors.AlignmentError`. Results have the field's declared dtype.

``"mean"`` and :class:`WeightedMean` of a field that every teacher codes with
:class:`~kdserve.TopK` of one kind mix the teachers' *distributions* (not their
logits), decoded or compact: see :mod:`kdserve.core.topk_mixture`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from kdserve.core.align import first_difference, rows_of
from kdserve.core.batch import Knowledge
from kdserve.core.codecs import Codec, TopK
from kdserve.core.ragged import Ragged
from kdserve.core.schema import SAMPLE_ID, Field, Schema
from kdserve.core.topk_mixture import mix_compact, mix_dense
from kdserve.errors import AlignmentError, MergeError

__all__ = [
    "Max",
    "Mean",
    "MergeStrategy",
    "Merger",
    "Min",
    "Sum",
    "Take",
    "WeightedMean",
    "strategy_from_spec",
]

Values = Mapping[str, Any]  # teacher name -> ndarray or Ragged, in registration order


class MergeStrategy(ABC):
    """How one field's values from several teachers become one value."""

    name: ClassVar[str]

    def check(self, field: str, teachers: Sequence[str]) -> None:  # noqa: B027 -- optional hook
        """Raise MergeError if this strategy cannot merge ``field`` from ``teachers``."""

    def merge(self, field: Field, values: Values) -> Any:
        """Merge per-teacher arrays (or Ragged, which must agree on sequence lengths)."""
        first = next(iter(values.values()))
        if not isinstance(first, Ragged):
            return _as_dtype(self.combine(values), field.dtype)
        _check_lengths(field, values)
        merged = self.combine({t: v.values for t, v in values.items()})
        return Ragged(_as_dtype(merged, field.dtype), first.offsets)

    @abstractmethod
    def combine(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        """Merge equally shaped arrays, one per teacher."""


class _Reduce(MergeStrategy):
    reduce: ClassVar[Callable[..., np.ndarray]]

    def combine(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        return type(self).reduce(np.stack(list(values.values())), axis=0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))


def _sum(stacked: np.ndarray, axis: int) -> np.ndarray:
    # A float16 sum would round after every addition; accumulate in float32 (as np.mean
    # does for float16) so the result is rounded to float16 once, at the end.
    dtype = np.float32 if stacked.dtype == np.float16 else None
    return np.asarray(np.sum(stacked, axis=axis, dtype=dtype))


class Sum(_Reduce):
    """Element-wise sum over teachers."""

    name = "sum"
    reduce = _sum


class Mean(_Reduce):
    """Element-wise mean over teachers."""

    name = "mean"
    reduce = np.mean


class Max(_Reduce):
    """Element-wise maximum over teachers."""

    name = "max"
    reduce = np.max


class Min(_Reduce):
    """Element-wise minimum over teachers."""

    name = "min"
    reduce = np.min


@dataclass(frozen=True)
class WeightedMean(MergeStrategy):
    """``sum(w_t * x_t) / sum(w_t)``; weights by teacher name, or by position in a list."""

    weights: Mapping[str, float] | Sequence[float]
    name: ClassVar[str] = "weighted_mean"

    def _by_name(self, teachers: Sequence[str]) -> dict[str, float]:
        if isinstance(self.weights, Mapping):
            return {t: float(self.weights[t]) for t in teachers if t in self.weights}
        return {t: float(w) for t, w in zip(teachers, self.weights, strict=False)}

    def check(self, field: str, teachers: Sequence[str]) -> None:
        weights = self._by_name(teachers)
        missing = [t for t in teachers if t not in weights]
        if missing or (
            not isinstance(self.weights, Mapping) and len(self.weights) != len(teachers)
        ):
            raise MergeError(
                f"weighted_mean for field {field!r} needs one weight per teacher "
                f"{list(teachers)}; got {self.weights!r}",
                field=field,
            )
        # Written so that NaN (every comparison False) is refused too: it would make the
        # merged values NaN, as would an infinite weight (inf / inf).
        bad = any(not (0 <= w < np.inf) for w in weights.values())
        if bad or sum(weights.values()) <= 0:
            raise MergeError(
                f"weighted_mean weights for field {field!r} must be finite and >= 0 with a "
                f"positive sum; got {weights}",
                field=field,
            )

    def combine(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        weights = self._by_name(list(values))
        total = sum(weights.values())
        out = sum(weights[t] / total * v.astype(np.float64) for t, v in values.items())
        return np.asarray(out)


@dataclass(frozen=True)
class _TopKMixture(MergeStrategy):
    """Mean or WeightedMean of a field every teacher codes with TopK of one kind: the
    weighted mixture of their distributions, decoded or compact (``decode=False``)."""

    kind: str
    weights: Mapping[str, float]  # by teacher, summing to one
    codec: TopK | None  # the teachers' common k, kind and tail; None when they differ
    name: ClassVar[str] = "topk_mixture"

    def merge(self, field: Field, values: Values) -> Any:
        first = next(iter(values.values()))
        if not isinstance(first, Mapping):
            return super().merge(field, values)
        if self.codec is None:
            raise MergeError(_COMPACT_ONLY.format([field.name]), field=field.name)
        ragged = isinstance(first["values"], Ragged)
        if ragged:
            _check_lengths(field, {t: v["values"] for t, v in values.items()})
        parts = [
            {c: v.values if ragged else v for c, v in comps.items()} for comps in values.values()
        ]
        weights = [self.weights[t] for t in values]
        merged = mix_compact(self.codec, field.inner_shape[-1], parts, weights, field.dtype)
        if ragged:
            return {c: Ragged(v, first["values"].offsets) for c, v in merged.items()}
        return merged

    def combine(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        return mix_dense(list(values.values()), [self.weights[t] for t in values], self.kind)


def _mixture(
    strategy: MergeStrategy, owners: list[str], codecs: list[Codec | None]
) -> MergeStrategy:
    """``strategy``, or its mixture form for a field every owner codes with TopK of one kind."""
    topks = [c for c in codecs if isinstance(c, TopK)]
    kinds = {c.kind for c in topks}
    if (
        not isinstance(strategy, (Mean, WeightedMean))
        or len(topks) != len(codecs)
        or len(kinds) > 1
    ):
        return strategy
    if isinstance(strategy, WeightedMean):
        raw = strategy._by_name(owners)
    else:
        raw = dict.fromkeys(owners, 1.0)
    weights = {t: w / sum(raw.values()) for t, w in raw.items()}
    common = len({(c.k, c.kind, c.tail) for c in topks}) == 1
    return _TopKMixture(topks[0].kind, weights, topks[0] if common else None)


_COMPACT_ONLY = (
    "decode=False cannot merge coded field(s) {} in compact form: only a field that every "
    "teacher codes with TopK of the same k, kind and tail, merged with 'mean' or "
    "WeightedMean, is merged compactly (the mixture of the teachers' distributions); read "
    "it with decode=True, or register one teacher per coded field"
)


@dataclass(frozen=True)
class Take(MergeStrategy):
    """Use one teacher's value: by name, or by index among the teachers that produce the field."""

    teacher: str | int
    name: ClassVar[str] = "take"

    def _pick(self, teachers: Sequence[str]) -> str:
        if isinstance(self.teacher, int):
            return teachers[self.teacher]
        return self.teacher

    def check(self, field: str, teachers: Sequence[str]) -> None:
        ok = (
            -len(teachers) <= self.teacher < len(teachers)
            if isinstance(self.teacher, int)
            else self.teacher in teachers
        )
        if not ok:
            raise MergeError(
                f"Take({self.teacher!r}) for field {field!r}: that teacher does not produce "
                f"it; the field comes from {list(teachers)}",
                field=field,
            )

    def merge(self, field: Field, values: Values) -> Any:
        value = values[self._pick(list(values))]
        if isinstance(value, Ragged):
            return Ragged(value.values.astype(field.dtype, copy=False), value.offsets)
        return value.astype(field.dtype, copy=False)

    def combine(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        return values[self._pick(list(values))]


@dataclass(frozen=True)
class Custom(MergeStrategy):
    """A user callable ``f({teacher: array}) -> array`` (arrays: values of sequences)."""

    fn: Callable[[Mapping[str, np.ndarray]], Any]
    name: ClassVar[str] = "custom"

    def combine(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        first = next(iter(values.values()))
        out = np.asarray(self.fn(values))
        if out.shape != first.shape:
            raise MergeError(
                f"the merge callable {self.fn!r} returned shape {out.shape}, expected "
                f"{first.shape} (the teachers' shape)"
            )
        return out


STRATEGIES: dict[str, type[MergeStrategy]] = {s.name: s for s in (Sum, Mean, Max, Min)}

StrategySpec = str | MergeStrategy | Callable[[Mapping[str, np.ndarray]], Any]


def strategy_from_spec(spec: StrategySpec, field: str = "?") -> MergeStrategy:
    """Resolve ``"mean"``, a MergeStrategy, or a callable into a MergeStrategy."""
    if isinstance(spec, MergeStrategy):
        return spec
    if isinstance(spec, type) and issubclass(spec, MergeStrategy):
        # The class itself (``Mean`` for ``Mean()``) is callable, but not a merge callable.
        try:
            return spec()
        except TypeError:
            raise MergeError(
                f"merge strategy for field {field!r} is the class {spec.__name__}, which needs "
                f"arguments; pass an instance such as {spec.__name__}(...)",
                field=field,
            ) from None
    if isinstance(spec, str):
        if spec not in STRATEGIES:
            raise MergeError(
                f"unknown merge strategy {spec!r} for field {field!r}; use one of "
                f"{sorted(STRATEGIES)}, WeightedMean(...), Take(...) or a callable",
                field=field,
            )
        return STRATEGIES[spec]()
    if callable(spec):
        return Custom(spec)
    raise MergeError(f"merge strategy for field {field!r} must be a name, a strategy or a callable")


class Merger:
    """Merges per-teacher batches into one, after checking the teachers' schemas fit together.

    ``schemas`` maps teacher name -> its knowledge schema, in registration order.
    :attr:`schema` is the merged (decoded, codec-free) schema.
    """

    def __init__(
        self, schemas: Mapping[str, Schema], strategies: Mapping[str, StrategySpec] | None = None
    ) -> None:
        if not schemas:
            raise MergeError("register at least one teacher before merging")
        self.teachers = list(schemas)
        self._owners: dict[str, list[str]] = {}
        self._codecs: dict[str, list[Codec | None]] = {}  # each owner's codec
        fields: dict[str, Field] = {}
        for teacher, schema in schemas.items():
            for f in schema:
                plain = f.with_codec(None)
                if f.name in fields and (fields[f.name] != plain):
                    raise MergeError(
                        f"field {f.name!r} differs between teachers {self._owners[f.name]} "
                        f"({_signature(fields[f.name])}) and {teacher!r} ({_signature(plain)}); "
                        f"teachers must agree on a shared field's dtype and shape",
                        field=f.name,
                    )
                fields.setdefault(f.name, plain)
                self._owners.setdefault(f.name, []).append(teacher)
                self._codecs.setdefault(f.name, []).append(f.codec)
        self.schema = Schema(fields.values())
        strategies = dict(strategies or {})
        unknown = [name for name in strategies if name not in fields]
        if unknown:
            raise MergeError(
                f"merge strategies name field(s) {unknown} that no teacher produces; "
                f"the teachers produce {list(fields)}",
                field=unknown[0],
            )
        self._strategies: dict[str, MergeStrategy] = {}
        for name, owners in self._owners.items():
            if name in strategies:
                strategy = strategy_from_spec(strategies[name], name)
                strategy.check(name, owners)
                self._strategies[name] = _mixture(strategy, owners, self._codecs[name])
            elif len(owners) > 1:
                raise MergeError(
                    f"field {name!r} comes from teachers {owners} but has no merge strategy; "
                    f"pass merge_strategy={{{name!r}: 'mean'}} (or 'sum', 'max', 'min', "
                    f"WeightedMean, Take, a callable)",
                    field=name,
                )

    @property
    def owners(self) -> dict[str, list[str]]:
        """Each merged field, and the teachers that give it."""
        return {name: list(owners) for name, owners in self._owners.items()}

    def check_compact(self) -> None:
        """Raise MergeError if a coded field cannot be merged in compact form (``decode=False``):
        only a field from one teacher without a strategy, or a TopK mixture, can."""
        refused = [
            name
            for name, strategy in self._strategies.items()
            if any(self._codecs[name])
            and not (isinstance(strategy, _TopKMixture) and strategy.codec is not None)
        ]
        if refused:
            raise MergeError(_COMPACT_ONLY.format(refused), field=refused[0])

    def merge(self, batches: Mapping[str, Knowledge]) -> Knowledge:
        """Merge one batch per teacher (same sample ids) into one batch."""
        missing = [t for t in self.teachers if t not in batches]
        if missing:
            raise MergeError(f"no batch from teacher(s) {missing}")
        for teacher in self.teachers:
            needed = [SAMPLE_ID] + [n for n, owners in self._owners.items() if teacher in owners]
            lacking = [n for n in needed if n not in batches[teacher]]
            if lacking:
                raise MergeError(
                    f"the batch from teacher {teacher!r} lacks {lacking}, which its schema "
                    f"declares; it has {list(batches[teacher])}",
                    field=lacking[0],
                )
        reference = self.teachers[0]
        ids = np.asarray(batches[reference][SAMPLE_ID])
        aligned = {reference: batches[reference]}
        for teacher in self.teachers[1:]:
            aligned[teacher] = _align(reference, ids, teacher, batches[teacher])
        out: Knowledge = {SAMPLE_ID: ids}
        for f in self.schema:
            owners = self._owners[f.name]
            values = {t: aligned[t][f.name] for t in owners}
            strategy = self._strategies.get(f.name)
            if strategy is None:
                out[f.name] = values[owners[0]]
            else:
                out[f.name] = strategy.merge(f, values)
        return out


def _check_lengths(field: Field, values: Mapping[str, Ragged]) -> None:
    """Raise MergeError unless the teachers' sequences have equal lengths."""
    first = next(iter(values.values()))
    for teacher, value in values.items():
        if not np.array_equal(value.offsets, first.offsets):
            raise MergeError(
                f"teachers disagree on the sequence lengths of field {field.name!r} "
                f"(teacher {teacher!r}); element-wise strategies need equal lengths, "
                f"use Take(teacher) for this field instead",
                field=field.name,
            )


def _signature(f: Field) -> str:
    return f"{f.dtype}{list(f.shape)}"


def _align(reference: str, ids: np.ndarray, teacher: str, batch: Knowledge) -> Knowledge:
    """``batch`` reordered to the reference ids, or AlignmentError if the ids differ."""
    other = np.asarray(batch[SAMPLE_ID])
    if np.array_equal(ids, other):
        return batch
    if len(ids) == len(other) and len(np.unique(ids)) == len(ids):
        perm = rows_of(other, ids)
        if perm is not None:
            return {k: _take_rows(v, perm) for k, v in batch.items()}
    row = first_difference(ids, other)
    a = int(ids[row]) if row < len(ids) else None
    b = int(other[row]) if row < len(other) else None
    raise AlignmentError(
        f"teachers {reference!r} and {teacher!r} hold different samples: at row {row} of "
        f"this batch {reference!r} has sample_id {a} and {teacher!r} has {b} "
        f"({len(ids)} vs {len(other)} rows). Teachers must read the same samples; check their "
        f"readers' order, shuffling and drop_last",
        teachers=(reference, teacher),
        sample_ids=(a, b),
    )


def _take_rows(value: Any, rows: np.ndarray) -> Any:
    if isinstance(value, dict):  # a coded field's components (decode=False)
        return {k: _take_rows(v, rows) for k, v in value.items()}
    if isinstance(value, Ragged):
        lengths = value.lengths[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Step j of output sequence k comes from value.offsets[rows[k]] + (j - offsets[k]).
        shift = np.repeat(value.offsets[:-1][rows] - offsets[:-1], lengths)
        return Ragged(value.values[shift + np.arange(offsets[-1])], offsets)
    return np.asarray(value)[rows]


def _as_dtype(result: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """The merged values in the field's dtype; integer fields round to nearest, halves to
    even (the mean of 3 and 4 is 4, not the 3 a plain cast would give)."""
    if dtype.kind in "iu" and result.dtype.kind == "f":
        result = np.rint(result)
    return result.astype(dtype, copy=False)
