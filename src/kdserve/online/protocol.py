"""The online wire protocol: every request, reply and metadata kdserve sends, as a small typed
value with ``to_bytes()`` and ``from_bytes(raw, what)``.

Each is a flat UTF-8 JSON object, parsed within a size and depth limit (no recursion, see
:func:`kdserve.online.messages.load_json`), that carries ``"version": VERSION``
(:mod:`kdserve.online.wire`); a message without one is version 1. Decoding checks every
field: any other field, a missing one, a wrong type or a value out of range is refused
with a one-line :class:`~kdserve.errors.ProtocolError` naming it; a message of another
version is refused naming both versions and the fix (upgrade the older side).

    Ticket       do_get: {"pass": int >= 0, "seq": int >= 0, "rank": 0 <= int < world_size,
                 "world_size": 1 <= int <= MAX_WORLD_SIZE}; seq % world_size == rank
    Ack          do_action("ack"): the same fields; pass <= times (== times: all passes over)
    RecvRequest  do_action("recv"): {"after": int >= 0, "wait": seconds >= 0}, both optional
    SendRequest  do_action("send"): {"student": str, "message": <a kdserve message>}
    TeacherInfo  do_action("info")'s reply: name, times, buf_size, stream, query,
                 kdserve_version; max_message_bytes, model and provenance (at most
                 MAX_PROVENANCE_ITEMS names to strings, numbers or booleans) optional
    MessageLimit do_action("limits")'s reply: {"max_message_bytes": int >= 1}, answered
                 before the teacher's service starts too (info waits for it)
    ChunkMeta    a knowledge stream message's app metadata: pass, seq, part, parts; "rows"
                 when it holds several small batches, "shares" at the end of a rank's pass
    ErrorInfo    a refused call's Flight ``extra_info``: the kdserve exception's kind (its
                 class name), message and context (field, path, sample_ids, ...)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from kdserve import errors
from kdserve._version import __version__
from kdserve.errors import KdserveError, ProtocolError
from kdserve.online.messages import (
    MAX_MESSAGE_BYTES,
    MAX_MESSAGE_DEPTH,
    decode_message,
    encode_message,
)
from kdserve.online.wire import VERSION, Fields, check_version, dump, one_line, quote

__all__ = [
    "ERROR_KINDS",
    "MAX_POSITION",
    "MAX_PROVENANCE_BYTES",
    "MAX_PROVENANCE_ITEMS",
    "MAX_PROVENANCE_NAME",
    "MAX_SENDER_CHARS",
    "MAX_WORLD_SIZE",
    "VERSION",
    "Ack",
    "ChunkMeta",
    "ErrorInfo",
    "MessageLimit",
    "RecvRequest",
    "SendRequest",
    "TeacherInfo",
    "Ticket",
]

MAX_WORLD_SIZE = 1 << 16  # data-parallel ranks a ticket may name
MAX_POSITION = (1 << 53) - 1  # pass, seq and message indices (exact in any JSON reader)
MAX_REQUEST_BYTES = 64 << 10  # a ticket, ack or recv request: a few numbers
MAX_SENDER_CHARS = 256  # a student id in a send request (ours are 32 hex digits)
_ENVELOPE_BYTES = MAX_SENDER_CHARS * 6 + 64  # what a send request adds to its message
MAX_PROVENANCE_ITEMS = 64  # names in a teacher's provenance
MAX_PROVENANCE_NAME = 256  # characters of one name
MAX_PROVENANCE_BYTES = 16 << 10  # its JSON: a teacher's info stays far below 64 KiB
_MAX_CONTEXT_ITEMS = 32
ERROR_KINDS: dict[str, type[KdserveError]] = {
    name: kind
    for name in errors.__all__
    if isinstance(kind := getattr(errors, name), type) and issubclass(kind, KdserveError)
}
"""The exceptions that cross the wire by name: kdserve's own, from :mod:`kdserve.errors`."""

T = TypeVar("T", bound="Ticket")


@dataclass(frozen=True)
class Ticket:
    """Rank ``rank`` of ``world_size`` asks for its batches of a pass from ``seq`` on."""

    pass_: int
    seq: int
    rank: int
    world_size: int
    WHAT: ClassVar[str] = "ticket"

    def to_bytes(self) -> bytes:
        return dump(
            {"pass": self.pass_, "seq": self.seq, "rank": self.rank, "world_size": self.world_size}
        )

    @classmethod
    def from_bytes(
        cls: type[T],
        raw: bytes,
        what: str | None = None,
        *,
        max_bytes: int = MAX_REQUEST_BYTES,
        last_pass: int = MAX_POSITION,
    ) -> T:
        """Checked, with pass in ``[0, last_pass]`` (a teacher's ``times`` for an ack)."""
        fields = Fields(
            raw, what or cls.WHAT, {"pass", "seq", "rank", "world_size"}, set(), max_bytes
        )
        world = fields.integer("world_size", 1, MAX_WORLD_SIZE)
        rank = fields.integer("rank", 0, world - 1)
        pass_ = fields.integer("pass", 0, last_pass)
        seq = fields.integer("seq", 0, MAX_POSITION)
        if seq % world != rank:
            raise fields.fail(f"batch {seq} does not belong to rank {rank} of {world}")
        return cls(pass_, seq, rank, world)


class Ack(Ticket):
    """Rank ``rank`` has every one of its batches before ``(pass_, seq)``: the window may
    drop them (``pass_ == times``: the rank is through with the last pass)."""

    WHAT = "ack"


@dataclass(frozen=True)
class RecvRequest:
    """The teacher's messages from index ``after`` on, waiting up to ``wait`` s for one."""

    after: int = 0
    wait: float = 0.0

    def to_bytes(self) -> bytes:
        return dump({"after": self.after, "wait": self.wait})

    @classmethod
    def from_bytes(
        cls, raw: bytes, what: str = "recv request", *, max_bytes: int = MAX_REQUEST_BYTES
    ) -> RecvRequest:
        fields = Fields(raw, what, set(), {"after", "wait"}, max_bytes)
        return cls(fields.integer("after", 0, MAX_POSITION), fields.seconds("wait"))


@dataclass(frozen=True)
class SendRequest:
    """A student's message to its teacher; ``message`` is any kdserve message (JSON values
    and numpy arrays, :mod:`kdserve.online.messages`)."""

    student: str
    message: Any

    def to_bytes(
        self, *, max_bytes: int = MAX_MESSAGE_BYTES, max_depth: int = MAX_MESSAGE_DEPTH
    ) -> bytes:
        """The request; ValueError/TypeError, nothing sent, for a bad sender or message."""
        if not isinstance(self.student, str) or not 0 < len(self.student) <= MAX_SENDER_CHARS:
            raise ValueError(f"a sender id is a string of 1 to {MAX_SENDER_CHARS} characters")
        body = encode_message(self.message, max_bytes=max_bytes, max_depth=max_depth)
        head = dump({"student": self.student})[:-1]  # the message is spliced in, not re-encoded
        return head + b', "message": ' + body + b"}"

    @classmethod
    def from_bytes(
        cls,
        raw: bytes,
        what: str = "message",
        *,
        max_bytes: int = MAX_MESSAGE_BYTES,
        max_depth: int = MAX_MESSAGE_DEPTH,
    ) -> SendRequest:
        """Checked; the limits are the message's (the request's own part is allowed for)."""
        if len(raw) > max_bytes + _ENVELOPE_BYTES:
            raise ProtocolError(
                f"a message of about {len(raw) - _ENVELOPE_BYTES} bytes is over the teacher's "
                f"limit of {max_bytes} (Limits(message_bytes=...)); send smaller messages"
            )
        value = decode_message(raw, max_bytes=max_bytes + _ENVELOPE_BYTES, max_depth=max_depth + 1)
        if not isinstance(value, dict):
            raise ProtocolError("a message envelope holds exactly 'student' and 'message'")
        check_version(value, what)
        if set(value) != {"student", "message"}:
            raise ProtocolError("a message envelope holds exactly 'student' and 'message'")
        sender = value["student"]
        if not isinstance(sender, str) or not 0 < len(sender) <= MAX_SENDER_CHARS:
            raise ProtocolError(f"a message's sender is not a string of 1 to {MAX_SENDER_CHARS}")
        return cls(sender, value["message"])


@dataclass(frozen=True)
class TeacherInfo:
    """What a teacher serves: its passes (``times``), window (``buf_size``), a knowledge
    stream and/or queries, and the size of message it takes; and what makes its knowledge
    comparable: the kdserve version it runs, its ``model`` and its ``provenance``
    (``Teacher(provenance=...)``: tokenizer, vocab_size, temperature, ...)."""

    name: str
    times: int
    buf_size: int
    stream: bool
    query: bool
    max_message_bytes: int = MAX_MESSAGE_BYTES
    kdserve_version: str = __version__
    model: str | None = None
    provenance: Mapping[str, str | int | float | bool] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        values = {k: v for k, v in vars(self).items() if v is not None}
        return dump(values | {"provenance": dict(self.provenance)})

    @classmethod
    def from_bytes(cls, raw: bytes, what: str = "teacher info") -> TeacherInfo:
        required = {"name", "times", "buf_size", "stream", "query", "kdserve_version"}
        fields = Fields(raw, what, required, {"max_message_bytes", "model", "provenance"})
        return cls(
            name=fields.text("name"),
            times=fields.integer("times", 0, MAX_POSITION),
            buf_size=fields.integer("buf_size", 0, MAX_POSITION),
            stream=fields.flag("stream"),
            query=fields.flag("query"),
            max_message_bytes=fields.integer(
                "max_message_bytes", 1, MAX_POSITION, default=MAX_MESSAGE_BYTES
            ),
            kdserve_version=fields.text("kdserve_version", 64),
            model=fields.optional_text("model"),
            provenance=fields.scalars("provenance", MAX_PROVENANCE_ITEMS, MAX_PROVENANCE_NAME),
        )


@dataclass(frozen=True)
class MessageLimit:
    """The largest message a teacher takes and sends (``Limits(message_bytes=)``),
    known from the moment it listens: students' messages may come before its service."""

    max_message_bytes: int

    def to_bytes(self) -> bytes:
        return dump({"max_message_bytes": self.max_message_bytes})

    @classmethod
    def from_bytes(cls, raw: bytes, what: str = "message limit") -> MessageLimit:
        fields = Fields(raw, what, {"max_message_bytes"}, set())
        return cls(fields.integer("max_message_bytes", 1, MAX_POSITION))


@dataclass(frozen=True)
class ChunkMeta:
    """One knowledge stream message: part ``part`` of ``parts`` of batch ``seq`` of pass
    ``pass_``; ``rows``: it holds batches seq, seq + world_size, ... of these rows;
    ``shares``: it ends the rank's pass, and every rank gets these rows of it."""

    pass_: int
    seq: int
    part: int = 0
    parts: int = 1
    rows: tuple[int, ...] | None = None
    shares: tuple[int, ...] | None = None

    def to_bytes(self) -> bytes:
        extra = {
            k: list(v) for k, v in (("rows", self.rows), ("shares", self.shares)) if v is not None
        }
        return dump(
            {"pass": self.pass_, "seq": self.seq, "part": self.part, "parts": self.parts} | extra
        )

    @classmethod
    def from_bytes(cls, raw: bytes, what: str = "batch metadata") -> ChunkMeta:
        fields = Fields(raw, what, {"pass", "seq", "part", "parts"}, {"rows", "shares"})
        parts = fields.integer("parts", 1, MAX_POSITION)
        return cls(
            pass_=fields.integer("pass", 0, MAX_POSITION),
            seq=fields.integer("seq", 0, MAX_POSITION),
            part=fields.integer("part", 0, parts - 1),
            parts=parts,
            rows=fields.counts("rows"),
            shares=fields.counts("shares"),
        )


def _is_context(key: str, value: Any) -> bool:
    """Whether an exception attribute can travel as context: a plain name (not one of
    BaseException's) holding a JSON scalar or a short list of them."""
    if not key.isidentifier() or key.startswith("_") or hasattr(BaseException, key):
        return False
    items = value if isinstance(value, (list, tuple)) else [value]
    return len(items) <= _MAX_CONTEXT_ITEMS and all(
        v is None or type(v) in (bool, int, str) or (type(v) is float and math.isfinite(v))
        for v in items
    )


@dataclass(frozen=True)
class ErrorInfo:
    """Why a teacher refused a call: a kdserve exception as ``kind`` (its class name),
    ``message`` (one line) and ``context`` (its attributes: field, path, sample_ids, ...)."""

    kind: str
    message: str
    context: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, exc: KdserveError, message: str | None = None) -> ErrorInfo:
        """``exc`` (or ``message`` in its place) as it crosses the wire."""
        kind = next(k.__name__ for k in type(exc).__mro__ if ERROR_KINDS.get(k.__name__) is k)
        context = {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in vars(exc).items()
            if _is_context(key, value)
        }
        return cls(kind, one_line(str(exc) if message is None else message), context)

    def to_bytes(self) -> bytes:
        return dump({"kind": self.kind, "message": self.message, "context": dict(self.context)})

    @classmethod
    def from_bytes(cls, raw: bytes, what: str = "error details") -> ErrorInfo:
        fields = Fields(raw, what, {"kind", "message"}, {"context"})
        context = fields.values.get("context", {})
        if not isinstance(context, dict) or not all(_is_context(*kv) for kv in context.items()):
            raise fields.fail(f"context must map names to values, got {quote(context)}")
        return cls(fields.text("kind", 64), fields.text("message", 4096), context)

    def exception(self, teacher: str) -> KdserveError:
        """The exception to raise for teacher ``teacher`` (as its student names it): of
        the same kdserve class, with the same message and context; an unknown kind (from
        a newer kdserve) is raised as a KdserveError that names it."""
        context = {k: tuple(v) if isinstance(v, list) else v for k, v in self.context.items()}
        context["teacher"] = teacher
        kind = ERROR_KINDS.get(self.kind)
        if kind is None:
            note = f" ({self.kind}, an error this kdserve does not know: upgrade it)"
            return KdserveError(f"teacher {teacher!r}: {self.message}{note}", **context)
        return kind(f"teacher {teacher!r}: {self.message}", **context)
