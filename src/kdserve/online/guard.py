"""The teacher's boundary: the token check every call passes first, and the translation of a
handler's failure into a one-line Flight error, so that no server traceback reaches a peer.

A refused call's Flight error carries its reason twice: as text for any Flight client
("kdserve: <reason>", or "kdserve internal: ..." for a failure the teacher did not expect,
which is logged here with its traceback), and as an
:class:`~kdserve.online.protocol.ErrorInfo` in ``extra_info``, from which the kdserve client
raises the same exception class with the same message and context. The teacher being
unavailable (not started yet, closing, its inbox full) is Flight's "unavailable", which
clients retry.
"""

from __future__ import annotations

import functools
import hmac
import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import pyarrow as pa
from pyarrow import flight

from kdserve.errors import KdserveError, TeacherUnavailableError
from kdserve.online.protocol import ErrorInfo
from kdserve.online.replay import WindowStoppedError

__all__ = ["TokenCheck", "flight_error", "guard_stream", "guarded", "refusal"]

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)


class _Named(Protocol):
    name: str


class TokenCheck(flight.ServerMiddlewareFactory):  # type: ignore[misc]
    """Refuses calls without ``authorization: Bearer <token>``; logs each refusal (never a
    token). ``teacher`` gives the teacher's name as it is when a call comes."""

    def __init__(self, token: str, teacher: Callable[[], str]) -> None:
        super().__init__()
        self._expected = f"Bearer {token}".encode()
        self._teacher = teacher

    def start_call(self, info: Any, headers: dict[str, list[Any]]) -> None:
        given = headers.get("authorization") or []
        value = given[0] if given else b""
        if isinstance(value, str):
            value = value.encode("utf-8", "replace")
        if not isinstance(value, bytes) or not hmac.compare_digest(value, self._expected):
            log.warning(
                "teacher %s: refused a %s call with a %s token",
                self._teacher(),
                info.method,
                "wrong" if given else "missing",
            )
            raise flight.FlightUnauthenticatedError(
                f"teacher {self._teacher()!r} refused the token: pass the token the teacher "
                f"was started with (token= or KDSERVE_TOKEN)"
            )


def refusal(
    exc: KdserveError, message: str | None = None, *, transient: bool = True
) -> flight.FlightError:
    """The Flight error for ``exc`` (its message, or ``message`` in its place): unavailable
    (retried) for a ``transient`` TeacherUnavailableError, else a server error, with the
    ErrorInfo attached."""
    info = ErrorInfo.of(exc, message)
    kind = flight.FlightUnavailableError
    if not (transient and isinstance(exc, TeacherUnavailableError)):
        kind = flight.FlightServerError
    return kind(f"kdserve: {info.message}", extra_info=info.to_bytes())


def flight_error(exc: BaseException, teacher: str, where: str, context: Any) -> BaseException:
    """The Flight error a client gets for ``exc``, raised in handler ``where``."""
    error: BaseException
    if isinstance(exc, flight.FlightError) or not isinstance(exc, Exception):
        error = exc  # ours already; or GeneratorExit, KeyboardInterrupt: not ours to eat
    elif isinstance(exc, WindowStoppedError):
        # closing: the student waits for a teacher that may come back; failed: it would
        # wait in vain (it is told why at once, non-transient)
        stopped = TeacherUnavailableError(f"teacher {teacher!r}: {exc}", teacher=teacher)
        error = refusal(stopped, transient=not exc.failed)
    elif isinstance(exc, KdserveError):  # a request this teacher refuses
        error = refusal(exc)
    elif isinstance(exc, pa.ArrowException) and _cancelled(context):
        log.debug("teacher %s: %s cancelled by %s: %s", teacher, where, peer(context), exc)
        error = flight.FlightCancelledError(f"kdserve: the {where} call was cancelled")
    else:
        log.error("teacher %s: %s from %s failed", teacher, where, peer(context), exc_info=exc)
        info = ErrorInfo(
            "KdserveError",
            f"teacher {teacher!r} failed on a {where} call ({type(exc).__name__}); the "
            f"teacher's log has the details",
        )
        error = flight.FlightServerError(
            f"kdserve internal: {info.message}", extra_info=info.to_bytes()
        )
    return error


def guarded(method: F) -> F:
    """A Flight handler whose every failure reaches the client as :func:`flight_error`."""

    @functools.wraps(method)
    def run(self: _Named, context: Any, *args: Any) -> Any:
        try:
            return method(self, context, *args)
        except BaseException as exc:
            raise flight_error(exc, self.name, method.__name__, context) from None

    return run  # type: ignore[return-value]


def guard_stream(items: Iterator[Any], teacher: str, where: str, context: Any) -> Iterator[Any]:
    """``items``, with a failure while streaming them turned into :func:`flight_error`."""
    try:
        yield from items
    except BaseException as exc:
        raise flight_error(exc, teacher, where, context) from None


def _cancelled(context: Any) -> bool:
    """Whether the client went away (its call's failures are then no teacher's fault)."""
    try:
        return bool(context.is_cancelled())
    except Exception:
        return False


def peer(context: Any) -> str:
    """Who called, for the log (a gRPC peer such as ``ipv4:127.0.0.1:50412``)."""
    try:
        return str(context.peer())
    except Exception:
        return "an unknown peer"
