"""Codecs: lossy encodings a teacher applies to float knowledge, to shrink the wire and the disk.

A codec works on an array of rows ``(n, *inner_shape)`` -- the samples of a fixed-shape
field, or the steps of a sequence field -- and acts element-wise or along the last axis.
It encodes into named *components*, each a numpy array with its own per-row shape; a
codec with one component is stored as a plain column, several become an Arrow struct.

    name   error bound (per element, x = original)                     size vs float32
    fp16   |x - y| <= 2**-11 |x|   for |x| in float16's normal range   0.5
    bf16   |x - y| <= 2**-8 |x|    (float32's range)                   0.5
    int8   |x - y| <= max|row| / 254                                    (D + 4) / 4D
    topk   the k largest entries kept exactly; the rest share the tail  k(4 + idx) + 4 / 4D
           mass uniformly, so softmax/probabilities keep summing to 1

Codecs are resolved by name (``"fp16"``) or by a JSON spec (``{"name": "topk", "k": 8}``),
which is also how they are recorded in a schema's metadata.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from kdserve.errors import CodecError

__all__ = ["Bf16", "Codec", "Fp16", "Int8", "TopK", "codec_from_spec"]

Parts = dict[str, np.ndarray]
Layout = dict[str, tuple[np.dtype[Any], tuple[int, ...]]]


class Codec(ABC):
    """An encoding of float rows into named components, and its (lossy) inverse."""

    name: ClassVar[str]

    def check(self, field: str, dtype: np.dtype[Any], inner_shape: tuple[int, ...]) -> None:
        """Raise CodecError unless this codec can encode rows of ``dtype`` and ``inner_shape``."""
        if not np.issubdtype(dtype, np.floating):
            raise CodecError(
                f"codec {self.name!r} applies to float fields, but field {field!r} is {dtype}; "
                f"remove the codec from this field",
                field=field,
                codec=self.name,
            )

    @abstractmethod
    def layout(self, dtype: np.dtype[Any], inner_shape: tuple[int, ...]) -> Layout:
        """The components' dtypes and per-row shapes for rows of ``dtype`` and ``inner_shape``."""

    @abstractmethod
    def encode(self, rows: np.ndarray, field: str) -> Parts:
        """Encode rows ``(n, *inner_shape)`` into components."""

    @abstractmethod
    def decode(
        self, parts: Mapping[str, np.ndarray], dtype: np.dtype[Any], inner_shape: tuple[int, ...]
    ) -> np.ndarray:
        """Rebuild rows ``(n, *inner_shape)`` of ``dtype`` from components."""

    def to_json(self) -> dict[str, Any]:
        """The spec that :func:`codec_from_spec` turns back into this codec."""
        return {"name": self.name, **asdict(self)}  # type: ignore[call-overload]


class _Cast(Codec):
    """An element-wise codec: one ``data`` component of the same shape, another dtype."""

    stored: ClassVar[np.dtype[Any]]

    def layout(self, dtype: np.dtype[Any], inner_shape: tuple[int, ...]) -> Layout:
        return {"data": (self.stored, inner_shape)}


@dataclass(frozen=True)
class Fp16(_Cast):
    """IEEE half precision (Pantheon's ``use_fp16``). Refuses values beyond +-65504."""

    name: ClassVar[str] = "fp16"
    stored: ClassVar[np.dtype[Any]] = np.dtype(np.float16)

    def encode(self, rows: np.ndarray, field: str) -> Parts:
        # Check before casting: the cast would warn, and values in (65504, 65520) would
        # silently become 65504 although this codec refuses everything beyond +-65504.
        overflow = np.isfinite(rows) & (np.abs(rows) > _FP16_MAX)
        if overflow.any():
            raise CodecError(
                f"field {field!r} has values beyond float16's range (max |x| = "
                f"{float(np.abs(rows[overflow]).max()):.4g} > 65504); use codec 'bf16' instead",
                field=field,
                codec=self.name,
            )
        return {"data": rows.astype(np.float16)}

    def decode(
        self, parts: Mapping[str, np.ndarray], dtype: np.dtype[Any], inner_shape: tuple[int, ...]
    ) -> np.ndarray:
        return parts["data"].astype(dtype)


@dataclass(frozen=True)
class Bf16(_Cast):
    """bfloat16 stored as uint16 bit patterns: float32's range with 8 significant bits."""

    name: ClassVar[str] = "bf16"
    stored: ClassVar[np.dtype[Any]] = np.dtype(np.uint16)

    def encode(self, rows: np.ndarray, field: str) -> Parts:
        with np.errstate(over="ignore"):
            f32 = np.ascontiguousarray(rows, dtype=np.float32)
        finite = np.isfinite(f32)
        beyond = ~np.isinf(rows) & np.isinf(f32)
        if beyond.any():
            raise CodecError(
                f"field {field!r} has values beyond float32's range (max |x| = "
                f"{float(np.abs(rows[beyond]).max()):.4g}), which bf16 cannot hold; store "
                f"this field without a codec",
                field=field,
                codec=self.name,
            )
        bits = f32.view(np.uint32)
        # Round to nearest, ties to even, on the 16 bits that are dropped.
        rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
        out = rounded.astype(np.uint16)
        # Finite values above bf16's largest finite value would round to +-inf: keep them
        # finite at +-max (0x7F7F), which is within the error bound; 0x7F80 - 1 == 0x7F7F.
        out[finite & ((out & np.uint16(0x7FFF)) == np.uint16(0x7F80))] -= np.uint16(1)
        out[np.isnan(f32)] = 0x7FC0
        return {"data": out}

    def decode(
        self, parts: Mapping[str, np.ndarray], dtype: np.dtype[Any], inner_shape: tuple[int, ...]
    ) -> np.ndarray:
        values = (parts["data"].astype(np.uint32) << 16).view(np.float32)
        dtype = np.dtype(dtype)
        if dtype.itemsize < values.itemsize:
            # A float16 field: bf16 rounding can carry 65504 up to 65536, which would
            # overflow to inf; clamp finite values to the target's range instead.
            top = float(np.finfo(dtype).max)
            values = np.where(np.isinf(values), values, np.clip(values, -top, top))
        return values.astype(dtype, copy=False)


@dataclass(frozen=True)
class Int8(Codec):
    """Symmetric int8 quantisation with one float32 scale per row (over the last axis)."""

    name: ClassVar[str] = "int8"

    def check(self, field: str, dtype: np.dtype[Any], inner_shape: tuple[int, ...]) -> None:
        super().check(field, dtype, inner_shape)
        _need_last_axis(self.name, field, inner_shape)

    def layout(self, dtype: np.dtype[Any], inner_shape: tuple[int, ...]) -> Layout:
        return {
            "q": (np.dtype(np.int8), inner_shape),
            "scale": (np.dtype(np.float32), inner_shape[:-1]),
        }

    def encode(self, rows: np.ndarray, field: str) -> Parts:
        _need_finite(self.name, field, rows)
        # At least float32 arithmetic: in float16 the scale of a small row would lose
        # precision (or underflow) and break the error bound.
        peak = np.abs(rows).max(axis=-1, initial=0).astype(np.promote_types(rows.dtype, np.float32))
        with np.errstate(over="ignore"):
            scale = (peak / 127).astype(np.float32)
        if not np.isfinite(scale).all():
            raise CodecError(
                f"field {field!r} has values too large for int8's float32 scale (max |x| = "
                f"{float(np.abs(rows).max()):.4g}); store this field without a codec",
                field=field,
                codec=self.name,
            )
        safe = np.where(scale == 0, np.float32(1), scale)
        q = np.rint(rows / safe[..., None]).clip(-127, 127).astype(np.int8)
        return {"q": q, "scale": scale}

    def decode(
        self, parts: Mapping[str, np.ndarray], dtype: np.dtype[Any], inner_shape: tuple[int, ...]
    ) -> np.ndarray:
        dtype = np.dtype(dtype)
        work = np.promote_types(dtype, np.float32)  # float64 for float64 fields
        with np.errstate(over="ignore"):
            out: np.ndarray = parts["q"].astype(work) * parts["scale"].astype(work)[..., None]
        if dtype.itemsize < 8:
            # 127 * scale can round just past the largest float32 (or float16) when a row
            # peaks there; the original values were finite, so clamp instead of giving inf.
            top = float(np.finfo(dtype).max)
            out = np.clip(out, -top, top)
        return out.astype(dtype, copy=False)


@dataclass(frozen=True)
class TopK(Codec):
    """Keep the ``k`` largest entries of the last axis (values + indices) and the tail mass.

    ``kind`` says what the field holds: ``"logits"`` (the tail mass is softmax
    probability outside the top k) or ``"probs"`` (it is ``1 - sum(top k)``). Decoding
    spreads the tail mass evenly over the other entries, so the decoded distribution
    gives the top-k entries their exact probabilities and still sums to one. With
    ``tail=False`` the other entries decode to probability 0.
    """

    k: int
    kind: Literal["logits", "probs"] = "logits"
    tail: bool = True

    name: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        k: Any = self.k
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
            raise CodecError(f"topk needs an integer k >= 1, got {self.k!r}", codec=self.name)
        object.__setattr__(self, "k", int(k))
        if self.kind not in ("logits", "probs"):
            raise CodecError(
                f"topk kind must be 'logits' or 'probs', got {self.kind!r}", codec=self.name
            )
        tail: Any = self.tail
        if not isinstance(tail, (bool, np.bool_)):
            raise CodecError(f"topk tail must be true or false, got {tail!r}", codec=self.name)
        object.__setattr__(self, "tail", bool(tail))

    def check(self, field: str, dtype: np.dtype[Any], inner_shape: tuple[int, ...]) -> None:
        super().check(field, dtype, inner_shape)
        _need_last_axis(self.name, field, inner_shape)
        if self.k > inner_shape[-1]:
            raise CodecError(
                f"topk k={self.k} exceeds the last axis of field {field!r} "
                f"({inner_shape[-1]}); choose k <= {inner_shape[-1]}",
                field=field,
                codec=self.name,
            )

    def layout(self, dtype: np.dtype[Any], inner_shape: tuple[int, ...]) -> Layout:
        parts: Layout = {
            "values": (np.dtype(dtype), (*inner_shape[:-1], self.k)),
            "indices": (_index_dtype(inner_shape[-1]), (*inner_shape[:-1], self.k)),
        }
        if self.tail:
            parts["tail"] = (np.dtype(np.float32), inner_shape[:-1])
        return parts

    def encode(self, rows: np.ndarray, field: str) -> Parts:
        _need_finite(self.name, field, rows)
        width = rows.shape[-1]
        if self.k > width:
            raise CodecError(
                f"topk k={self.k} exceeds the last axis of field {field!r} ({width})",
                field=field,
                codec=self.name,
            )
        top = np.argpartition(rows, width - self.k, axis=-1)[..., width - self.k :]
        values = np.take_along_axis(rows, top, axis=-1)
        order = np.argsort(-values, axis=-1, kind="stable")
        values = np.take_along_axis(values, order, axis=-1)
        indices = np.take_along_axis(top, order, axis=-1).astype(_index_dtype(width))
        parts: Parts = {"values": values, "indices": indices}
        if self.tail:
            parts["tail"] = self._tail_mass(rows, values, top).astype(np.float32)
        return parts

    def _tail_mass(self, rows: np.ndarray, values: np.ndarray, top: np.ndarray) -> np.ndarray:
        if self.kind == "probs":
            mass: np.ndarray = np.clip(1.0 - values.sum(axis=-1, dtype=np.float64), 0.0, 1.0)
            return mass
        if self.k == rows.shape[-1]:
            return np.zeros(rows.shape[:-1])
        # sum(softmax(rows) outside the top k) = exp(lse(rest) - lse(all)), computed from
        # the rest itself: 1 - exp(lse(top) - lse(all)) loses all precision for small tails.
        rest = rows.astype(np.float64)
        np.put_along_axis(rest, top, -np.inf, axis=-1)
        tail: np.ndarray = np.clip(np.exp(_logsumexp(rest) - _logsumexp(rows)), 0.0, 1.0)
        return tail

    def decode(
        self, parts: Mapping[str, np.ndarray], dtype: np.dtype[Any], inner_shape: tuple[int, ...]
    ) -> np.ndarray:
        values = parts["values"].astype(np.float64)
        indices = parts["indices"].astype(np.intp)
        width = inner_shape[-1]
        rest = width - self.k
        tail = parts["tail"].astype(np.float64) if self.tail else np.zeros(values.shape[:-1])
        if self.kind == "probs":
            fill = tail / rest if rest else np.zeros_like(tail)
        else:
            fill = self._logit_fill(values, tail, rest)
        out = np.repeat(fill[..., None], width, axis=-1)
        np.put_along_axis(out, indices, values, axis=-1)
        return out.astype(dtype)

    @staticmethod
    def _logit_fill(values: np.ndarray, tail: np.ndarray, rest: int) -> np.ndarray:
        """The logit that gives each of ``rest`` entries an equal share of ``tail``."""
        floor = np.log(np.finfo(np.float32).tiny)
        if rest == 0:
            return np.zeros(values.shape[:-1])
        with np.errstate(divide="ignore"):
            log_tail = np.log(tail) - np.log1p(-np.minimum(tail, 1 - 1e-12))
        fill = _logsumexp(values) + log_tail - np.log(rest)
        # No tail mass: push the other entries below anything softmax can see (a finite
        # logit rather than -inf). A tail that is merely tiny keeps its own, exact fill.
        lowest = values.min(axis=-1) + floor
        out: np.ndarray = np.where(tail > 0, fill, lowest)
        return out


_FP16_MAX = float(np.finfo(np.float16).max)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    return np.asarray(top[..., 0] + np.log(np.exp(x - top).sum(axis=-1)))


def _index_dtype(width: int) -> np.dtype[Any]:
    return np.dtype(np.uint16) if width <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def _need_last_axis(codec: str, field: str, inner_shape: tuple[int, ...]) -> None:
    if not inner_shape:
        raise CodecError(
            f"codec {codec!r} works along the last axis, but field {field!r} holds one scalar "
            f"per sample; use 'fp16' or 'bf16' for scalar fields",
            field=field,
            codec=codec,
        )


def _need_finite(codec: str, field: str, rows: np.ndarray) -> None:
    if not np.isfinite(rows).all():
        raise CodecError(
            f"field {field!r} holds NaN or infinite values, which codec {codec!r} cannot encode; "
            f"check the teacher's outputs or use 'fp16'/'bf16'",
            field=field,
            codec=codec,
        )


CODECS: dict[str, type[Codec]] = {c.name: c for c in (Fp16, Bf16, Int8, TopK)}


def codec_from_spec(spec: str | Mapping[str, Any] | Codec | None) -> Codec | None:
    """Resolve ``"fp16"``, ``{"name": "topk", "k": 8}`` or a Codec instance (None: no codec)."""
    if spec is None or isinstance(spec, Codec):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise CodecError(f"a codec is a name or a dict with a 'name' key, got {spec!r}")
    params = dict(spec)
    name = params.pop("name")
    if not isinstance(name, str) or name not in CODECS:
        raise CodecError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}", codec=str(name))
    try:
        return CODECS[name](**params)
    except TypeError as exc:
        raise CodecError(f"bad parameters for codec {name!r}: {exc}", codec=name) from None
