"""Limits: how much an online teacher accepts from students, as one option object
(``Teacher(limits=kd.Limits(query_bytes=1 << 30))``), like httpx's ``Limits``."""

from __future__ import annotations

from dataclasses import dataclass, fields

from kdserve.online.messages import MAX_MESSAGE_BYTES
from kdserve.online.protocol import MAX_REQUEST_BYTES
from kdserve.online.serve_query import DEFAULT_MAX_QUERY_BYTES

__all__ = ["DEFAULT_MAX_INBOX_BYTES", "Limits"]

DEFAULT_MAX_INBOX_BYTES = 64 << 20


@dataclass(frozen=True)
class Limits:
    """Sizes an online teacher accepts, in bytes: ``request_bytes`` (a ticket, ack or
    recv request; 64 KiB), ``message_bytes`` (one message either way; 4 MiB),
    ``inbox_bytes`` (students' messages the teacher has not received yet; 64 MiB) and
    ``query_bytes`` (one input batch of a query; 256 MiB). Anything larger is refused
    with a one-line error naming the limit."""

    request_bytes: int = MAX_REQUEST_BYTES
    message_bytes: int = MAX_MESSAGE_BYTES
    inbox_bytes: int = DEFAULT_MAX_INBOX_BYTES
    query_bytes: int = DEFAULT_MAX_QUERY_BYTES

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits({f.name}=...) must be an int >= 1, got {value!r}")

    def server_options(self) -> dict[str, int]:
        """The limits as :class:`~kdserve.online.server.TeacherServer` keywords."""
        return {f"max_{f.name}": getattr(self, f.name) for f in fields(self)}
