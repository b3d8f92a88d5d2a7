"""Every exception kdserve raises, in one tree.

Catch ``KdserveError`` to handle them all. Each message names the field, teacher
or file at fault and what to do about it; the same facts are attributes too.

    KdserveError
    ├── SchemaError              a field's name, dtype or shape does not fit the schema
    │   └── CodecError           a codec cannot encode or decode a field's values
    ├── MergeError               merge strategies that cannot apply to the registered teachers
    │   └── AlignmentError       teachers' batches hold different sample ids
    ├── StoreError               a knowledge store that is missing, truncated or corrupted
    ├── TeacherUnavailableError  a teacher cannot be reached or stopped answering
    ├── AuthenticationError      a wrong or missing token
    └── ProtocolError            a peer sent something kdserve does not understand
"""

from __future__ import annotations

__all__ = [
    "AlignmentError",
    "AuthenticationError",
    "CodecError",
    "KdserveError",
    "MergeError",
    "ProtocolError",
    "SchemaError",
    "StoreError",
    "TeacherUnavailableError",
]


class KdserveError(Exception):
    """Base class of every error kdserve raises."""


class SchemaError(KdserveError, ValueError):
    """Knowledge that does not match its schema: unknown field, wrong dtype or shape."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class CodecError(SchemaError):
    """A codec that cannot encode or decode a field's values."""

    def __init__(self, message: str, *, field: str | None = None, codec: str | None = None):
        super().__init__(message, field=field)
        self.codec = codec


class MergeError(KdserveError, ValueError):
    """Merge strategies that do not fit the registered teachers' knowledge."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class AlignmentError(MergeError):
    """Teachers whose batches hold different sample ids: merging them would be wrong."""

    def __init__(
        self,
        message: str,
        *,
        teachers: tuple[str, str],
        sample_ids: tuple[int | None, int | None],
    ) -> None:
        super().__init__(message)
        self.teachers = teachers
        self.sample_ids = sample_ids


class StoreError(KdserveError):
    """A knowledge store that is missing, truncated, corrupted or incompatible."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class TeacherUnavailableError(KdserveError):
    """A teacher that cannot be reached, or that died and did not come back in time."""

    def __init__(self, message: str, *, teacher: str | None = None) -> None:
        super().__init__(message)
        self.teacher = teacher


class AuthenticationError(KdserveError):
    """A request with a wrong or missing token."""

    def __init__(self, message: str, *, teacher: str | None = None) -> None:
        super().__init__(message)
        self.teacher = teacher


class ProtocolError(KdserveError):
    """A peer that sent a message kdserve does not understand (version or format mismatch)."""
