"""The student's side of errors crossing the wire: a teacher's Flight error as the kdserve
exception it stands for (the teacher's side is :mod:`kdserve.online.guard`).

A kdserve teacher attaches an :class:`~kdserve.online.protocol.ErrorInfo` to every error
it raises; the client raises that exception's class with its message and context, naming
the teacher. An error without one is a TeacherUnavailableError when the teacher went away
(the connection dropped), else a ProtocolError quoting its text (from gRPC itself, or from
a peer that is no kdserve teacher). Errors in :data:`TRANSIENT` are retried.
"""

from __future__ import annotations

from pyarrow import flight

from kdserve.errors import KdserveError, ProtocolError, TeacherUnavailableError
from kdserve.online.protocol import ErrorInfo

__all__ = ["TRANSIENT", "from_flight", "reason"]

TRANSIENT = (
    flight.FlightUnavailableError,
    flight.FlightTimedOutError,
    flight.FlightInternalError,
    flight.FlightCancelledError,
)
"""Flight errors that a retry may cure: the teacher is starting, restarting or busy."""


def _info(exc: BaseException) -> ErrorInfo | None:
    """The ErrorInfo ``exc`` carries; None if it carries none (ProtocolError if it is bad)."""
    raw = getattr(exc, "extra_info", None)
    return ErrorInfo.from_bytes(raw) if raw else None


def reason(exc: BaseException) -> str:
    """Why the call failed, in one line: the teacher's message, else the error's text
    (without gRPC's debug context)."""
    try:
        info = _info(exc)
    except ProtocolError:
        info = None
    return info.message if info is not None else " ".join(str(exc).split(". Detail:")[0].split())


def from_flight(exc: flight.FlightError, teacher: str, address: str) -> KdserveError:
    """The kdserve error for a Flight error of teacher ``teacher`` at ``address``."""
    try:
        info = _info(exc)
    except ProtocolError as bad:
        return ProtocolError(f"teacher {teacher!r} at {address} failed ({bad}): {reason(exc)}")
    if info is None and isinstance(exc, flight.FlightUnavailableError):  # it went away
        return TeacherUnavailableError(
            f"teacher {teacher!r} at {address} went away during the call: {reason(exc)}",
            teacher=teacher,
        )
    if info is None:
        return ProtocolError(f"teacher {teacher!r} at {address} failed: {reason(exc)}")
    return info.exception(teacher)
