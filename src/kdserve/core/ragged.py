"""Ragged: a batch of variable-length sequences (Pantheon's lod_level 1) as values + offsets.

Sample ``i`` is ``values[offsets[i]:offsets[i + 1]]``. Keeping the sequences packed
lets them move to and from Arrow list arrays without copying the values.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdserve.errors import SchemaError

__all__ = ["Ragged"]


@dataclass(frozen=True, eq=False)
class Ragged:
    """Variable-length sequences packed along the first axis of ``values``.

    ``values`` has shape ``(total_length, *inner_shape)``; ``offsets`` is an int array
    of ``len(self) + 1`` non-decreasing positions starting at 0.
    """

    values: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        offsets = np.asarray(self.offsets)
        if offsets.ndim != 1 or offsets.size == 0 or not np.issubdtype(offsets.dtype, np.integer):
            raise SchemaError("Ragged offsets must be a non-empty 1-D integer array")
        if offsets[0] != 0 or offsets[-1] != len(self.values):
            raise SchemaError(
                f"Ragged offsets must start at 0 and end at len(values)={len(self.values)}, "
                f"got {int(offsets[0])}..{int(offsets[-1])}"
            )
        if offsets.size > 1 and np.any(np.diff(offsets) < 0):
            raise SchemaError("Ragged offsets must be non-decreasing")
        object.__setattr__(self, "offsets", offsets)

    @classmethod
    def from_list(cls, sequences: Sequence[Any], dtype: Any = None) -> Ragged:
        """Pack a list of arrays (one per sample, equal trailing shape) into a Ragged. An
        empty sequence (``np.array([])``, float64 and 1-D whatever it stands for) takes
        the dtype and trailing shape of the others."""
        arrays = [np.asarray(s, dtype=dtype) for s in sequences]
        if not arrays:
            raise SchemaError("cannot infer a sequence field from an empty list of samples")
        filled = [a for a in arrays if a.size or a.ndim != 1]
        if filled and len(filled) < len(arrays):
            like = filled[0]
            common = like.dtype if dtype is not None else np.result_type(*filled)
            empty = np.empty((0, *like.shape[1:]), dtype=common)
            arrays = [a if a.size or a.ndim != 1 else empty for a in arrays]
        inner = arrays[0].shape[1:]
        for i, a in enumerate(arrays):
            if a.ndim == 0 or a.shape[1:] != inner:
                raise SchemaError(
                    f"sequence {i} has shape {a.shape}; every sequence must have shape "
                    f"(length, *{inner}) like sequence 0"
                )
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        return cls(np.concatenate(arrays), _offsets_from_lengths(lengths))

    @classmethod
    def from_lengths(cls, values: Any, lengths: Any) -> Ragged:
        """Sequences packed one after another in ``values``, of ``lengths`` steps each."""
        return cls(np.asarray(values), _offsets_from_lengths(np.asarray(lengths, np.int64)))

    @classmethod
    def from_padded(cls, padded: np.ndarray, lengths: Any) -> Ragged:
        """Pack a padded ``(batch, max_len, ...)`` array, keeping ``lengths[i]`` steps of row i."""
        padded = np.asarray(padded)
        lengths = np.asarray(lengths, dtype=np.int64)
        if padded.ndim < 2 or lengths.shape != (padded.shape[0],):
            raise SchemaError(
                f"padded sequences need shape (batch, max_len, ...) and one length per row; "
                f"got padded {padded.shape} and lengths {lengths.shape}"
            )
        if np.any(lengths < 0) or np.any(lengths > padded.shape[1]):
            raise SchemaError(f"lengths must lie in [0, {padded.shape[1]}], got {lengths.tolist()}")
        mask = np.arange(padded.shape[1]) < lengths[:, None]
        return cls(padded[mask], _offsets_from_lengths(lengths))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return (
            f"Ragged(len={len(self)}, inner_shape={self.inner_shape}, "
            f"dtype={self.values.dtype}, lengths={self.lengths.tolist()[:8]}"
            f"{'...' if len(self) > 8 else ''})"
        )

    @property
    def lengths(self) -> np.ndarray:
        """Length of each sequence."""
        return np.diff(self.offsets)

    @property
    def inner_shape(self) -> tuple[int, ...]:
        """Shape of one step of a sequence."""
        return tuple(self.values.shape[1:])

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.values.dtype

    def to_padded(self, pad_value: float = 0) -> np.ndarray:
        """Copy into a ``(batch, max_len, *inner_shape)`` array filled with ``pad_value``."""
        lengths = self.lengths
        max_len = int(lengths.max()) if len(lengths) else 0
        out = np.full((len(self), max_len, *self.inner_shape), pad_value, dtype=self.dtype)
        out[np.arange(max_len) < lengths[:, None]] = self.values
        return out

    def equals(self, other: Ragged) -> bool:
        """True when both hold the same sequences (values compared exactly)."""
        return bool(
            np.array_equal(self.offsets, other.offsets)
            and np.array_equal(self.values, other.values)
        )


def _offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets
