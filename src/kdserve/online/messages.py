"""Messages between teachers and students: JSON-compatible values and numpy arrays, no pickle.

A message is encoded as UTF-8 JSON. A numpy array becomes
``{"__ndarray__": {"dtype": "<f4", "shape": [2, 3], "data": "<base64>"}}``; anything
else that JSON cannot hold is refused when sending, and nothing but JSON is ever
decoded, so a peer cannot make the receiver run code.

Limits, on both sides: a message is at most ``MAX_MESSAGE_BYTES`` encoded (a teacher may
be configured with another limit, which its students learn from its ``info``) and nests
at most ``MAX_MESSAGE_DEPTH`` lists, dicts or arrays deep (an array counts 3 levels: its
encoding). The sender refuses a message over them (``ValueError``); the receiver checks
size and depth of the bytes *before* parsing, without recursion (:func:`json_depth`), so
no message can make either side raise ``RecursionError`` or parse megabytes of JSON.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from kdserve.errors import ProtocolError

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_MESSAGE_DEPTH",
    "decode_message",
    "encode_message",
    "json_depth",
    "load_json",
]

MAX_MESSAGE_BYTES = 4 << 20  # gRPC's customary message size; arrays of ~3 MB raw fit
MAX_MESSAGE_DEPTH = 64  # far beyond real messages, far below Python's recursion limit

_ARRAY = "__ndarray__"
_ARRAY_DEPTH = 3  # {"__ndarray__": {"shape": [...]}}
_ARRAY_KEYS = {"dtype", "shape", "data"}
_MAX_DIMS = 32  # numpy's own limit is 64
_ESCAPE = re.compile(rb"\\[\s\S]")  # a backslash and the byte it escapes
_STRING = re.compile(rb'"[^"]*(?:"|\Z)')  # a string (escapes removed), or its unterminated rest
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_OPENING = np.zeros(256, np.int8)
_OPENING[list(b"[{")] = 1


# -- bounded JSON --------------------------------------------------------------------------


def json_depth(data: bytes) -> int:
    """How deep lists and objects nest in UTF-8 JSON ``data``: a linear scan, no recursion.

    Brackets inside strings do not count. For malformed JSON the answer is an upper bound
    on how deep a parser could get before failing (an unterminated string hides nothing).
    """
    bare = _STRING.sub(b"", _ESCAPE.sub(b"__", data))
    brackets = bare.translate(None, _NOT_BRACKET)
    if not brackets:
        return 0
    steps = _OPENING[np.frombuffer(brackets, np.uint8)].astype(np.int64) * 2 - 1
    return max(0, int(np.cumsum(steps).max()))


def load_json(
    data: bytes,
    what: str,
    *,
    max_bytes: int,
    max_depth: int,
    object_hook: Callable[[dict[str, Any]], Any] | None = None,
) -> Any:
    """Parse UTF-8 JSON of at most ``max_bytes`` and ``max_depth`` levels; ProtocolError
    naming ``what`` for anything else (the size and depth are checked before parsing)."""
    if len(data) > max_bytes:
        raise ProtocolError(f"{what} is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not kdserve JSON: not UTF-8") from None
    depth = json_depth(data)
    if depth > max_depth:
        raise ProtocolError(f"{what} nests {depth} levels deep, over the limit of {max_depth}")
    try:
        return json.loads(text, object_hook=object_hook)
    except ProtocolError as exc:  # from object_hook: an array that is not one of ours
        raise ProtocolError(f"{what} is not kdserve JSON: {exc}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ProtocolError(f"{what} is not kdserve JSON: {reason}") from None


# -- sending -------------------------------------------------------------------------------


def _to_json(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufc":
            raise TypeError(f"cannot send an array of dtype {value.dtype}: numbers only")
        data = np.ascontiguousarray(value)
        return {
            _ARRAY: {
                "dtype": data.dtype.str,
                "shape": list(value.shape),  # ascontiguousarray makes 0-d arrays 1-d
                "data": base64.b64encode(data.tobytes()).decode("ascii"),
            }
        }
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(
        f"cannot send a {type(value).__name__}: messages hold JSON values (dict, list, str, "
        f"int, float, bool, None) and numpy arrays"
    )


def _check_value(message: Any, max_bytes: int, max_depth: int) -> None:
    """Refuse, before encoding, a message nested too deep (cycles included), one whose
    arrays alone exceed ``max_bytes``, or a user dict shaped like an encoded array.
    Iterative: a deep message cannot make this recurse."""
    stack: list[tuple[Any, int]] = [(message, 0)]
    array_bytes = 0
    while stack:
        value, depth = stack.pop()
        if isinstance(value, np.ndarray):
            depth += _ARRAY_DEPTH
            array_bytes += value.nbytes * 4 // 3  # base64
        elif isinstance(value, (dict, list, tuple)):
            depth += 1
        if depth > max_depth:
            raise ValueError(
                f"message cannot be sent: it nests deeper than {max_depth} levels (lists, "
                f"dicts, and 3 per array); flatten it, or it holds itself"
            )
        if array_bytes > max_bytes:
            raise ValueError(
                f"message cannot be sent: its arrays alone take over {max_bytes} bytes "
                f"encoded (the teacher's Limits(message_bytes=...)); send smaller pieces"
            )
        if isinstance(value, dict):
            keys = [k for k in value if not isinstance(k, str)]
            if keys:
                key = keys[0]
                raise TypeError(
                    f"message cannot be sent: dict keys must be strings (JSON's), got "
                    f"{key!r}, which would arrive as {json.dumps(str(key))}"
                )
            if len(value) == 1 and _ARRAY in value:
                raise TypeError(
                    f"message cannot be sent: a dict whose only key is {_ARRAY!r} is reserved "
                    f"for numpy arrays; rename the key"
                )
            stack.extend((item, depth) for item in value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend((item, depth) for item in value)


def encode_message(
    message: Any, *, max_bytes: int = MAX_MESSAGE_BYTES, max_depth: int = MAX_MESSAGE_DEPTH
) -> bytes:
    """Encode a JSON-compatible value (numpy arrays allowed anywhere inside) to bytes.

    TypeError for what JSON and numpy cannot hold; ValueError for a message over the size
    or depth limit.
    """
    _check_value(message, max_bytes, max_depth)
    try:
        data = json.dumps(message, default=_to_json, allow_nan=True).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise TypeError(f"message cannot be sent: {exc}") from None
    if len(data) > max_bytes:
        raise ValueError(
            f"message cannot be sent: it is {len(data)} bytes encoded, over the limit of "
            f"{max_bytes} (the teacher's Limits(message_bytes=...)); send smaller pieces"
        )
    return data


# -- receiving -----------------------------------------------------------------------------


def _from_json(obj: dict[str, Any]) -> Any:
    if _ARRAY not in obj or len(obj) != 1:
        return obj
    spec = obj[_ARRAY]
    if not isinstance(spec, dict) or set(spec) != _ARRAY_KEYS:
        raise ProtocolError(f"a message holds an array spec without exactly {sorted(_ARRAY_KEYS)}")
    kind, shape, text = spec["dtype"], spec["shape"], spec["data"]
    if not isinstance(kind, str) or len(kind) > 16 or not isinstance(text, str):
        raise ProtocolError("a message holds an array whose dtype or data is not a short string")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMS
        or not all(type(n) is int and n >= 0 for n in shape)
    ):
        raise ProtocolError("a message holds an array whose shape is not a list of sizes")
    try:
        dtype = np.dtype(kind)
    except Exception:  # numpy's parser raises several types for nonsense
        raise ProtocolError(f"a message holds an array of unknown dtype {kind!r}") from None
    if dtype.kind not in "biufc":
        raise ProtocolError(f"a message holds an array of dtype {dtype}: numbers only")
    try:
        data = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ProtocolError("a message holds an array whose data is not base64") from None
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise ProtocolError(
            f"a message holds an array of shape {shape} and dtype {dtype} with {len(data)} "
            f"bytes of data"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def decode_message(
    data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES, max_depth: int = MAX_MESSAGE_DEPTH
) -> Any:
    """Decode bytes made by :func:`encode_message`; ProtocolError for anything else."""
    return load_json(
        data,
        "received a message that",
        max_bytes=max_bytes,
        max_depth=max_depth,
        object_hook=_from_json,
    )
