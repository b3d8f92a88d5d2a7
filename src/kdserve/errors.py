"""Every exception kdserve raises, in one tree.

Catch ``KdserveError`` to handle them all. Each message names the field, teacher
or file at fault and what to do about it; the same facts are attributes too.

    KdserveError
    ├── SchemaError              a field's name, dtype or shape does not fit the schema
    │   └── CodecError           a codec cannot encode or decode a field's values
    ├── MergeError               merge strategies that cannot apply to the registered teachers
    │   └── AlignmentError       teachers' batches hold different sample ids, or a
    │                            teacher writes a sample id its store already holds
    ├── StoreError               a knowledge store that is missing, truncated or corrupted
    │   └── StoreLockedError     another writer is writing the store
    ├── TeacherUnavailableError  a teacher cannot be reached or stopped answering
    ├── AuthenticationError      a wrong or missing token
    └── ProtocolError            a peer sent something kdserve does not understand
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AlignmentError",
    "AuthenticationError",
    "CodecError",
    "KdserveError",
    "MergeError",
    "ProtocolError",
    "SchemaError",
    "StoreError",
    "StoreLockedError",
    "TeacherUnavailableError",
]


class KdserveError(Exception):
    """Base class of every error kdserve raises.

    Keyword arguments are the error's context (``field``, ``teacher``, ``path``, ...)
    and become attributes, so handlers need not parse the message.
    """

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        for key, value in context.items():
            setattr(self, key, value)


class SchemaError(KdserveError, ValueError):
    """Knowledge that does not match its schema: unknown field, wrong dtype or shape."""

    field: str | None = None


class CodecError(SchemaError):
    """A codec that cannot encode or decode a field's values."""

    codec: str | None = None


class MergeError(KdserveError, ValueError):
    """Merge strategies that do not fit the registered teachers' knowledge."""

    field: str | None = None


class AlignmentError(MergeError):
    """Teachers whose batches hold different sample ids: merging them would be wrong.

    ``teachers`` names the two teachers, ``sample_ids`` their first differing ids. A
    teacher that writes a sample id its store already holds (or twice in one batch) gets
    one too: then ``teacher`` names it, ``teachers`` is it twice and ``sample_ids`` are
    the first repeated ids.
    """

    teachers: tuple[str, str]
    sample_ids: tuple[int | None, ...]
    teacher: str | None = None


class StoreError(KdserveError):
    """A knowledge store that is missing, truncated, corrupted or incompatible."""

    path: str | None = None


class StoreLockedError(StoreError):
    """A store another writer holds: two writers would interleave and corrupt its shards.

    ``pid`` and ``host`` name the writer holding the lock (None if it had not yet
    recorded itself). The lock dies with its process, so it never outlives a crash.
    """

    pid: int | None = None
    host: str | None = None


class TeacherUnavailableError(KdserveError):
    """A teacher that cannot be reached, or that died and did not come back in time."""

    teacher: str | None = None


class AuthenticationError(KdserveError):
    """A request with a wrong or missing token."""

    teacher: str | None = None


class ProtocolError(KdserveError):
    """A peer that sent a message kdserve does not understand (version or format mismatch)."""
