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
           values="uint8": log-probabilities within 1/32 nat              k(1 + idx) + 4 / 4D

Codecs are resolved by name (``"fp16"``) or by a JSON spec (``{"name": "topk", "k": 8}``),
which is also how they are recorded in a schema's metadata.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from kdserve.core.half import astype, bfloat16_bits
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

    def to_compact(self, parts: Mapping[str, np.ndarray]) -> Parts:
        """Stored components -> the compact form ``decode=False`` gives (numbers a loss
        can use); most codecs store exactly that."""
        return dict(parts)

    def from_compact(
        self, parts: Mapping[str, np.ndarray], field: str, inner_shape: tuple[int, ...]
    ) -> Parts:
        """The compact form given by a program (e.g. top-k computed on a device) ->
        components to store, checked against field ``field`` of ``inner_shape``."""
        return dict(parts)

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
        with np.errstate(over="ignore"):
            data = astype(rows, np.float16)
        # Only values that came out at the edge (+-65504 or +-inf) can be out of range:
        # look at the originals there, not over the whole array. Values in (65504, 65520)
        # would silently round to 65504, so they are refused as well.
        edge = (data.view(np.uint16) & np.uint16(0x7FFF)) >= np.uint16(_FP16_MAX_BITS)
        if edge.any():
            original = rows[edge]
            overflow = np.isfinite(original) & (np.abs(original) > _FP16_MAX)
            if overflow.any():
                raise CodecError(
                    f"field {field!r} has values beyond float16's range (max |x| = "
                    f"{float(np.abs(original[overflow]).max()):.4g} > 65504); use codec "
                    f"'bf16' instead",
                    field=field,
                    codec=self.name,
                )
        return {"data": data}

    def decode(
        self, parts: Mapping[str, np.ndarray], dtype: np.dtype[Any], inner_shape: tuple[int, ...]
    ) -> np.ndarray:
        return astype(parts["data"], dtype)


@dataclass(frozen=True)
class Bf16(_Cast):
    """bfloat16 stored as uint16 bit patterns: float32's range with 8 significant bits."""

    name: ClassVar[str] = "bf16"
    stored: ClassVar[np.dtype[Any]] = np.dtype(np.uint16)

    def encode(self, rows: np.ndarray, field: str) -> Parts:
        f32 = np.ascontiguousarray(rows, dtype=np.float32) if rows.itemsize <= 4 else None
        if f32 is None:  # float64: values beyond float32's range have no bf16 either
            with np.errstate(over="ignore"):
                f32 = rows.astype(np.float32)
            beyond = np.isinf(f32) & ~np.isinf(rows)
            if beyond.any():
                raise CodecError(
                    f"field {field!r} has values beyond float32's range (max |x| = "
                    f"{float(np.abs(rows[beyond]).max()):.4g}), which bf16 cannot hold; store "
                    f"this field without a codec",
                    field=field,
                    codec=self.name,
                )
        out = bfloat16_bits(f32)  # to nearest, ties to even
        nan = np.isnan(f32)  # NaN bits can carry into the sign or wrap: set them apart
        if nan.any():
            out[nan] = 0x7FC0
        # Finite values above bf16's largest finite value rounded to +-inf (0x7F80): keep
        # them finite at +-max (0x7F7F), which is within the error bound.
        edge = np.flatnonzero((out & np.uint16(0x7FFF)) == np.uint16(0x7F80))
        if len(edge):
            flat = out.reshape(-1)
            finite = edge[np.isfinite(f32.reshape(-1)[edge])]
            flat[finite] -= np.uint16(1)
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

    ``values="uint8"`` (logits only) stores each value as a log-probability relative to
    the position's top entry, in steps of 1/16 nat down to 254/16 nats below it (lower
    ones are clamped there: probability < 1.3e-7 of the top's): 1 byte instead of 2-4,
    each log-probability within 1/32 nat, which costs ~1e-4 nats/token of KL. The compact
    form (``decode=False``) gives them back as float32 ``-code/16``: logits up to a
    constant, what :func:`~kdserve.torch.topk_kd_loss` takes.

    ``p`` (top-p, logits only) keeps at each position the fewest top entries whose
    probabilities sum to at least ``p``, but at least ``min_k`` and at most ``k``; the
    rest joins the tail. Slots a position does not use hold value ``-inf`` (no
    probability) and the index of its top entry, so every position keeps the shape
    ``k`` (zstd compresses the unused slots away) and ``topk_kd_loss`` ignores them.
    """

    k: int
    kind: Literal["logits", "probs"] = "logits"
    tail: bool = True
    values: Literal["float", "uint8"] = "float"
    p: float | None = None
    min_k: int = 1

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
        if self.values not in ("float", "uint8"):
            raise CodecError(
                f"topk values must be 'float' (the field's dtype) or 'uint8' (8-bit "
                f"log-probabilities), got {self.values!r}",
                codec=self.name,
            )
        if self.values == "uint8" and self.kind != "logits":
            raise CodecError(
                "topk values='uint8' stores log-probabilities, so it needs kind='logits'; "
                "give the teacher's logits (or log-probabilities) rather than probabilities",
                codec=self.name,
            )
        if self.p is not None:
            self._check_top_p()

    def _check_top_p(self) -> None:
        """Top-p's parameters: 0 < p <= 1, 1 <= min_k <= k, logits with a tail."""
        p: Any = self.p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise CodecError(f"topk p must be a number in (0, 1], got {p!r}", codec=self.name)
        object.__setattr__(self, "p", float(p))
        min_k: Any = self.min_k
        if isinstance(min_k, bool) or not isinstance(min_k, (int, np.integer)):
            raise CodecError(f"topk min_k must be an integer, got {min_k!r}", codec=self.name)
        if not 1 <= min_k <= self.k:
            raise CodecError(
                f"topk min_k must be in 1..k={self.k}, got {min_k}; k is the most entries "
                f"top-p keeps",
                codec=self.name,
            )
        object.__setattr__(self, "min_k", int(min_k))
        if self.kind != "logits" or not self.tail:
            raise CodecError(
                "topk p= (top-p) needs kind='logits' and tail=True: the entries it drops "
                "join the tail",
                codec=self.name,
            )

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
        stored = np.dtype(np.uint8) if self.values == "uint8" else np.dtype(dtype)
        parts: Layout = {
            "values": (stored, (*inner_shape[:-1], self.k)),
            "indices": (_index_dtype(inner_shape[-1]), (*inner_shape[:-1], self.k)),
        }
        if self.tail:
            parts["tail"] = (np.dtype(np.float32), inner_shape[:-1])
        return parts

    def encode(self, rows: np.ndarray, field: str) -> Parts:
        width = rows.shape[-1]
        if self.k > width:
            raise CodecError(
                f"topk k={self.k} exceeds the last axis of field {field!r} ({width})",
                field=field,
                codec=self.name,
            )
        top = np.argpartition(rows, width - self.k, axis=-1)[..., width - self.k :]
        values = np.take_along_axis(rows, top, axis=-1)
        # NaN and +inf sort last, so they would be among the top k of their row: checking
        # the k kept values finds them. -inf outside the top k is a masked entry: fine.
        _need_finite(self.name, field, values)
        order = np.argsort(-values, axis=-1, kind="stable")
        values = np.take_along_axis(values, order, axis=-1)
        indices = np.take_along_axis(top, order, axis=-1).astype(_index_dtype(width))
        parts: Parts = {"values": values, "indices": indices}
        if self.tail:
            parts["tail"] = self._tail_mass(rows, values, top).astype(np.float32)
        return self._code(parts)

    def _tail_mass(self, rows: np.ndarray, values: np.ndarray, top: np.ndarray) -> np.ndarray:
        if self.kind == "probs":
            mass: np.ndarray = np.clip(1.0 - values.sum(axis=-1, dtype=np.float64), 0.0, 1.0)
            return mass
        if self.k == rows.shape[-1]:
            return np.zeros(rows.shape[:-1])
        # sum(softmax(rows) outside the top k), summed over the rest itself: 1 - (top
        # mass) would lose all precision for small tails. One exp pass in float32 over
        # blocks of rows that stay in cache (the full rows are the cost of a dump); rows
        # whose tail is too small for float32's exp are done again in float64.
        width, k = rows.shape[-1], top.shape[-1]
        flat, flat_top = rows.reshape(-1, width), top.reshape(-1, k)
        peak = values.reshape(-1, k)[:, :1]
        work = np.promote_types(rows.dtype, np.float32)
        rest = np.empty(len(flat))
        step = max(1, _BLOCK_ELEMENTS // width)
        scratch = np.empty((min(step, len(flat)), width), dtype=work)
        for lo in range(0, len(flat), step):
            block = scratch[: len(flat[lo : lo + step])]
            np.subtract(flat[lo : lo + step], peak[lo : lo + step], out=block, dtype=work)
            np.exp(block, out=block)
            np.put_along_axis(block, flat_top[lo : lo + step], 0, axis=-1)
            rest[lo : lo + step] = block.sum(axis=-1)
        kept = np.exp(values.astype(np.float64) - values[..., :1]).sum(axis=-1)
        rest = rest.reshape(kept.shape)
        tail: np.ndarray = rest / (rest + kept)
        tiny = tail < _F32_EXP_FLOOR
        if work == np.float32 and tiny.any():
            exact = rows[tiny].astype(np.float64)
            np.put_along_axis(exact, top[tiny], -np.inf, axis=-1)
            tail[tiny] = np.exp(_logsumexp(exact) - _logsumexp(rows[tiny]))
        clipped: np.ndarray = np.clip(tail, 0.0, 1.0)
        return clipped

    def from_compact(
        self, parts: Mapping[str, np.ndarray], field: str, inner_shape: tuple[int, ...]
    ) -> Parts:
        """Indices must lie within the field's last axis; float values may come in any
        order (``torch.topk(sorted=False)``): they are sorted, largest first, with their
        indices."""
        out = dict(parts)
        indices, width = np.asarray(out["indices"]), inner_shape[-1]
        values = np.asarray(out["values"])
        if indices.shape != values.shape or indices.dtype.kind not in "iu":
            raise CodecError(  # checked before sorting, which would hide it
                f"field {field!r}: top-k components 'values' {values.shape} and 'indices' "
                f"{indices.shape} must have one shape, the indices integers (got "
                f"{indices.dtype})",
                field=field,
                codec=self.name,
            )
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= width):
            raise CodecError(
                f"field {field!r} has top-k indices in {int(indices.min())}..."
                f"{int(indices.max())} but its last axis holds {width} entries; declare the "
                f"field with the model's whole vocabulary (e.g. a padded embedding's size)",
                field=field,
                codec=self.name,
            )
        if np.issubdtype(values.dtype, np.floating):
            if np.isnan(values).any() or np.isposinf(values).any():
                _need_finite(self.name, field, values)
            if not (values[..., :-1] >= values[..., 1:]).all():
                order = np.argsort(-values, axis=-1, kind="stable")
                out["values"] = np.take_along_axis(values, order, axis=-1)
                out["indices"] = np.take_along_axis(indices, order, axis=-1)
        return self._code(out)

    def _code(self, parts: Mapping[str, np.ndarray]) -> Parts:
        """Components in the compact form (float values sorted) -> as stored: top-p cut,
        values to 8 bits, as the codec says."""
        out = dict(parts)
        floats = np.issubdtype(np.asarray(out["values"]).dtype, np.floating)
        if self.p is not None and floats:
            out = self.top_p(out)
        if self.values == "uint8" and floats:
            values = np.asarray(out["values"], dtype=np.float32)
            with np.errstate(invalid="ignore"):  # -inf - -inf in unused slots: coded below
                depth = (values[..., :1] - values) * _LOGPROB_STEPS
            codes = np.rint(np.clip(depth, 0, _UNUSED - 1)).astype(np.uint8)
            codes[np.isneginf(values)] = _UNUSED
            out["values"] = codes
        return out

    def top_p(self, parts: Mapping[str, np.ndarray]) -> Parts:
        """Compact float components cut to top-p: the fewest entries reaching ``p``
        (``min_k``..``k``) kept, the rest to the tail; unused slots get ``-inf`` and the
        position's top index."""
        values = np.asarray(parts["values"], dtype=np.float64)
        tail = np.asarray(parts["tail"], dtype=np.float64)
        shifted = np.exp(values - values[..., :1])
        probs = shifted / shifted.sum(axis=-1, keepdims=True) * (1 - tail)[..., None]
        reached = np.cumsum(probs, axis=-1) >= (self.p or 1.0) * (1 - 1e-9)
        count = np.where(reached.any(axis=-1), reached.argmax(axis=-1) + 1, self.k)
        count = np.clip(count, self.min_k, self.k)
        unused = np.arange(self.k) >= count[..., None]
        indices = np.asarray(parts["indices"])
        return {
            "values": np.where(unused, -np.inf, parts["values"]).astype(
                np.asarray(parts["values"]).dtype
            ),
            "indices": np.where(unused, indices[..., :1], indices).astype(indices.dtype),
            "tail": np.clip(tail + np.where(unused, probs, 0).sum(axis=-1), 0, 1).astype(
                np.asarray(parts["tail"]).dtype
            ),
        }

    def to_compact(self, parts: Mapping[str, np.ndarray]) -> Parts:
        out = dict(parts)
        if self.values == "uint8":
            out["values"] = _UINT8_LOGPROBS[out["values"]]
        return out

    def decode(
        self, parts: Mapping[str, np.ndarray], dtype: np.dtype[Any], inner_shape: tuple[int, ...]
    ) -> np.ndarray:
        parts = self.to_compact(parts)
        values = parts["values"].astype(np.float64)
        indices = parts["indices"].astype(np.intp)
        width = inner_shape[-1]
        unused = np.isneginf(values) if self.p is not None else np.zeros(values.shape, bool)
        rest = width - (~unused).sum(axis=-1)  # per position: top-p keeps fewer than k
        tail = parts["tail"].astype(np.float64) if self.tail else np.zeros(values.shape[:-1])
        if self.kind == "probs":
            fill = np.where(rest > 0, tail / np.maximum(rest, 1), 0.0)
        else:
            fill = self._logit_fill(values, tail, rest)
        out = np.repeat(fill[..., None], width, axis=-1)
        # Unused slots repeat the top entry's index: write its value there, not -inf.
        np.put_along_axis(out, indices, np.where(unused, values[..., :1], values), axis=-1)
        return out.astype(dtype)

    @staticmethod
    def _logit_fill(values: np.ndarray, tail: np.ndarray, rest: np.ndarray) -> np.ndarray:
        """The logit that gives each of ``rest`` entries an equal share of ``tail``
        (``values`` may hold ``-inf`` in unused top-p slots)."""
        floor = np.log(np.finfo(np.float32).tiny)
        with np.errstate(divide="ignore"):
            log_tail = np.log(tail) - np.log1p(-np.minimum(tail, 1 - 1e-12))
            fill = _logsumexp(values) + log_tail - np.log(np.maximum(rest, 1))
        # No tail mass: push the other entries below anything softmax can see (a finite
        # logit rather than -inf). A tail that is merely tiny keeps its own, exact fill.
        lowest = np.where(np.isfinite(values), values, np.inf).min(axis=-1) + floor
        out: np.ndarray = np.where((tail > 0) & (rest > 0), fill, lowest)
        return out


_LOGPROB_STEPS = 16  # uint8 top-k values: 1/16 nat per step
_UNUSED = 255  # uint8 top-k code of a slot top-p left unused (-inf)
_UINT8_LOGPROBS = (0 - np.arange(256, dtype=np.float32)) / _LOGPROB_STEPS  # code -> log-prob
_UINT8_LOGPROBS[_UNUSED] = -np.inf
_BLOCK_ELEMENTS = 1 << 16  # top-k tail: rows summed a block (256 kB of float32) at a time
_F32_EXP_FLOOR = 1e-30  # below it float32's exp has lost digits (subnormals): redo in float64
_FP16_MAX = float(np.finfo(np.float16).max)
_FP16_MAX_BITS = 0x7BFF  # 65504's bit pattern; above it (sign aside): inf and NaN


def _logsumexp(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    top[np.isneginf(top)] = 0  # a row of -inf (no mass at all): log(0) = -inf below
    with np.errstate(divide="ignore"):
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
