"""The protocol's encoding (:mod:`kdserve.online.protocol` holds its messages): a message is
a flat UTF-8 JSON object carrying ``"version": VERSION``, and a received one is checked
here field by field, each refusal a one-line ProtocolError that names the message."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from kdserve.errors import ProtocolError
from kdserve.online.messages import load_json

__all__ = ["MAX_TEXT_CHARS", "VERSION", "Fields", "check_version", "dump", "one_line", "quote"]

VERSION = 2
"""The protocol version. Version 1 is also what kdserve sent before messages carried a
version: a message without one is read as version 1. Version 2: a teacher's info reports
its kdserve version, model and provenance (which version 1's strict info refuses)."""
_MAX_DEPTH = 4  # every message is a flat object (lists of numbers at most)
_MAX_BYTES = 64 << 10  # a reply or a chunk's metadata: a few numbers (and row counts)
MAX_TEXT_CHARS = 1024


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line, at most ``limit`` characters: safe to send as a reason."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def quote(value: object, limit: int = 60) -> str:
    """A peer's value quoted for an error message, cut short."""
    return one_line(repr(value), limit)


def dump(fields: Mapping[str, Any]) -> bytes:
    """``fields`` as a message of this protocol version."""
    return json.dumps({"version": VERSION, **fields}, allow_nan=False).encode()


def check_version(value: dict[str, Any], what: str) -> None:
    """Refuse ``value`` unless it is of this kdserve's protocol version (absent: 1)."""
    given = "version" in value
    got = value.pop("version", 1)
    if type(got) is not int or got < 1:
        raise ProtocolError(f"bad {what}: version must be an integer >= 1, got {quote(got)}")
    if got != VERSION:
        which = f"version {got}"
        if not given:
            which += " (it carries no version: an older kdserve, or no kdserve at all)"
        raise ProtocolError(
            f"bad {what}: it is kdserve protocol {which}, but this kdserve speaks version "
            f"{VERSION}; upgrade kdserve where version {min(got, VERSION)} runs (pip install "
            f"-U kdserve) so that both sides speak the same version"
        )


class Fields:
    """A received message's fields, checked one at a time; each error names the message."""

    def __init__(
        self,
        raw: bytes,
        what: str,
        required: set[str],
        optional: set[str],
        max_bytes: int = _MAX_BYTES,
    ) -> None:
        value = load_json(raw, what, max_bytes=max_bytes, max_depth=_MAX_DEPTH)
        if not isinstance(value, dict):
            raise ProtocolError(f"bad {what}: not a JSON object")
        check_version(value, what)
        missing = sorted(required - set(value))
        unknown = sorted(set(value) - required - optional)
        if missing or unknown:
            raise ProtocolError(
                f"bad {what}: "
                + "; ".join(
                    [f"missing {', '.join(missing)}"] * bool(missing)
                    + [f"unknown field(s) {quote(unknown)}"] * bool(unknown)
                )
                + f" (it takes {', '.join(sorted(required | optional | {'version'}))})"
            )
        self.values = value
        self.what = what

    def fail(self, reason: str) -> ProtocolError:
        """The error for a bad field of this message."""
        return ProtocolError(f"bad {self.what}: {reason}")

    def integer(self, key: str, low: int, high: int, default: int = 0) -> int:
        """An integer (not a bool) in ``[low, high]``."""
        value = self.values.get(key, default)
        if type(value) is not int:
            raise self.fail(f"{key} must be an integer, got {quote(value)}")
        if not low <= value <= high:
            raise self.fail(f"{key}={quote(value)} is outside [{low}, {high}]")
        return value

    def seconds(self, key: str) -> float:
        """A finite number >= 0 (0 when absent)."""
        value = self.values.get(key, 0)
        if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
            raise self.fail(f"{key} must be a number of seconds >= 0, got {quote(value)}")
        return float(value)

    def flag(self, key: str) -> bool:
        """A JSON boolean."""
        value = self.values[key]
        if type(value) is not bool:
            raise self.fail(f"{key} must be true or false, got {quote(value)}")
        return value

    def text(self, key: str, limit: int = MAX_TEXT_CHARS) -> str:
        """A string of 1 to ``limit`` characters."""
        value = self.values[key]
        if not isinstance(value, str) or not 0 < len(value) <= limit:
            raise self.fail(f"{key} must be a string of 1 to {limit} characters")
        return value

    def optional_text(self, key: str, limit: int = MAX_TEXT_CHARS) -> str | None:
        """A string of 1 to ``limit`` characters, or None when absent."""
        return self.text(key, limit) if key in self.values else None

    def scalars(self, key: str, max_items: int, max_key_chars: int) -> dict[str, Any]:
        """An object of at most ``max_items`` names (1 to ``max_key_chars`` characters) to
        strings (of at most the text limit), integers, finite numbers or booleans; {}
        when absent."""
        value = self.values.get(key, {})
        if not isinstance(value, dict) or len(value) > max_items:
            raise self.fail(f"{key} must be an object of at most {max_items} names")
        for name, item in value.items():
            if not 0 < len(name) <= max_key_chars or not (
                type(item) in (bool, int)
                or (type(item) is float and math.isfinite(item))
                or (type(item) is str and len(item) <= MAX_TEXT_CHARS)
            ):
                raise self.fail(
                    f"{key} maps names of 1 to {max_key_chars} characters to strings of at "
                    f"most {MAX_TEXT_CHARS} characters, numbers or booleans; got "
                    f"{quote(name)}: {quote(item)}"
                )
        return value

    def counts(self, key: str) -> tuple[int, ...] | None:
        """A list of integers >= 0 (None when absent)."""
        value = self.values.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(type(n) is int and n >= 0 for n in value):
            raise self.fail(f"{key} must be a list of integers >= 0, got {quote(value)}")
        return tuple(value)
