"""Messages between teachers and students: JSON-compatible values and numpy arrays, no pickle.

A message is encoded as UTF-8 JSON. A numpy array becomes
``{"__ndarray__": {"dtype": "<f4", "shape": [2, 3], "data": "<base64>"}}``; anything
else that JSON cannot hold is refused when sending, and nothing but JSON is ever
decoded, so a peer cannot make the receiver run code.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

from kdserve.errors import ProtocolError

__all__ = ["decode_message", "encode_message"]

_ARRAY = "__ndarray__"


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


def _from_json(obj: dict[str, Any]) -> Any:
    if _ARRAY in obj and len(obj) == 1:
        spec = obj[_ARRAY]
        dtype = np.dtype(spec["dtype"])
        if dtype.kind not in "biufc":
            raise ProtocolError(f"a message holds an array of dtype {dtype}: numbers only")
        data = base64.b64decode(spec["data"])
        return np.frombuffer(data, dtype=dtype).reshape(spec["shape"]).copy()
    return obj


def _refuse_reserved(value: Any) -> None:
    """A user dict shaped like an encoded array would be decoded as one: refuse it here."""
    if isinstance(value, dict):
        if len(value) == 1 and _ARRAY in value:
            raise TypeError(
                f"message cannot be sent: a dict whose only key is {_ARRAY!r} is reserved for "
                f"numpy arrays; rename the key"
            )
        for item in value.values():
            _refuse_reserved(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _refuse_reserved(item)


def encode_message(message: Any) -> bytes:
    """Encode a JSON-compatible value (numpy arrays allowed anywhere inside) to bytes."""
    _refuse_reserved(message)
    try:
        return json.dumps(message, default=_to_json, allow_nan=True).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise TypeError(f"message cannot be sent: {exc}") from None


def decode_message(data: bytes) -> Any:
    """Decode bytes made by :func:`encode_message`; ProtocolError for anything else."""
    try:
        return json.loads(data.decode("utf-8"), object_hook=_from_json)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"received a message that is not kdserve JSON: {exc}") from None
