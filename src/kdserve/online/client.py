"""A student's connection to one online teacher (an Arrow Flight client).

The token is ``token=``, else ``KDSERVE_TOKEN``, else (for a loopback address only) the
token that a teacher of this user on this host published (:mod:`kdserve.online.tokens`).

Calls retry with exponential backoff while the teacher cannot be reached, for up to
``connect_timeout`` seconds, then raise :class:`~kdserve.errors.TeacherUnavailableError`;
so teacher and student may start in either order, and a teacher that restarts is
waited for. A knowledge stream that breaks is asked for again from the first batch
not fully received (:mod:`kdserve.online.read_pass`): with the teacher's replay window,
no sample is lost or repeated. A teacher's error is raised as the kdserve exception it
reports (:mod:`kdserve.online.client_errors`).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import pyarrow as pa
from pyarrow import flight

from kdserve.core.schema import Schema
from kdserve.core.wait import backoff
from kdserve.errors import (
    AuthenticationError,
    KdserveError,
    ProtocolError,
    TeacherUnavailableError,
)
from kdserve.online import ask_query
from kdserve.online.address import is_loopback, location, split_address
from kdserve.online.client_errors import TRANSIENT, from_flight, reason
from kdserve.online.messages import MAX_MESSAGE_BYTES, MAX_MESSAGE_DEPTH, decode_message
from kdserve.online.protocol import (
    MAX_POSITION,
    Ack,
    MessageLimit,
    RecvRequest,
    SendRequest,
    TeacherInfo,
    Ticket,
)
from kdserve.online.read_pass import read_pass
from kdserve.online.server import check_not_forked_from_server
from kdserve.online.tokens import TOKEN_ENV, find_token, given_token, token_path

__all__ = ["TOKEN_ENV", "TeacherClient"]

T = TypeVar("T")
_MAX_BACKOFF = 1.0  # seconds between two attempts at most
_TOKEN_GRACE = 2.0  # seconds a loopback teacher may listen before its token is published
_GRPC_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", int(_MAX_BACKOFF * 1000)),
]


class _NoTokenYetError(Exception):
    """No explicit token, and no same-host teacher has published one for the address."""


class TeacherClient:
    """Calls to one teacher, with retries, auth and error translation."""

    def __init__(
        self,
        address: str,
        *,
        name: str,
        token: str | None = None,
        tls_root_certs: bytes | None = None,
        tls_client_cert: tuple[bytes, bytes] | None = None,
        connect_timeout: float = 60.0,
        stall_timeout: float | None = None,
    ) -> None:
        check_not_forked_from_server(name)
        self.name = name
        self.address = address
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout  # how long a query waits for an answer
        self.max_message_bytes = MAX_MESSAGE_BYTES  # until info() tells the teacher's
        self._told_limit = False  # info() was asked: max_message_bytes is the teacher's
        self._dropped: list[int] = []  # indices of the teacher's messages found undecodable
        self._lock = threading.Lock()
        self._readers: set[flight.FlightStreamReader] = set()  # knowledge streams open now
        self._exchanges: set[flight.FlightStreamReader] = set()  # queries' answers, open now
        self.cancels = 0  # times cancel_streams() was called: a stream sees it changed
        self._closed = False
        uri = location(address, tls_root_certs is not None)
        self._given = given_token(token)  # an explicit token always wins
        self._found: str | None = None  # else the token a same-host teacher published
        host_port = split_address(address)
        if not self._given and not (host_port and is_loopback(host_port[0])):
            raise AuthenticationError(_no_token(name, address), teacher=name)
        kwargs: dict[str, Any] = {"tls_root_certs": tls_root_certs} if tls_root_certs else {}
        if tls_client_cert is not None:  # mutual TLS: (cert chain, key) PEM
            kwargs |= {"cert_chain": tls_client_cert[0], "private_key": tls_client_cert[1]}
        # gRPC's own reconnect backoff grows to 120 s: a teacher back after a long outage
        # would go unnoticed for longer than connect_timeout. Cap it like call()'s backoff.
        self._client = flight.FlightClient(uri, generic_options=_GRPC_OPTIONS, **kwargs)

    def close(self) -> None:
        """Cancel every stream and query open now, and close the connection."""
        self._closed = True
        self.cancel_streams()
        with self._lock:
            exchanges = list(self._exchanges)
        for reader in exchanges:
            reader.cancel()
        self._client.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def cancel_streams(self) -> None:
        """Stop every knowledge stream open now, and the calls retrying to open one, from
        any thread: a read blocked on a teacher that sends nothing returns at once."""
        with self._lock:
            self.cancels += 1
            readers = list(self._readers)
        for reader in readers:
            reader.cancel()

    def release(self, reader: flight.FlightStreamReader) -> None:
        """Forget a knowledge stream or query exchange that ended (:meth:`get` or
        :meth:`exchange` opened it)."""
        with self._lock:
            self._readers.discard(reader)
            self._exchanges.discard(reader)

    def check_cancelled(self, since: int) -> None:
        """KdserveError if :meth:`cancel_streams` was called since ``cancels`` was ``since``."""
        if self.cancels != since:
            raise KdserveError(
                f"the knowledge stream of teacher {self.name!r} was cancelled: the student "
                f"stopped reading it (closed, or gave up on the teacher)"
            )

    # -- token ----------------------------------------------------------------------

    def _options(self) -> flight.FlightCallOptions:
        headers = [(b"authorization", f"Bearer {self._token()}".encode())]
        return flight.FlightCallOptions(headers=headers)

    def _token(self) -> str:
        """The token to send; _NoTokenYetError while a same-host teacher has published none
        (it may not have started yet: call() waits for it like for an unreachable one)."""
        if self._given:
            return self._given
        if self._found is None:
            self._found = find_token(self.address)
        if self._found is None:
            raise _NoTokenYetError("no token published for it yet")
        return self._found

    def _token_changed(self) -> bool:
        """After a refusal: whether the same-host teacher published another token (it was
        restarted), which the next attempt then sends."""
        if self._given:
            return False
        fresh = find_token(self.address)
        changed = fresh is not None and fresh != self._found
        self._found = fresh
        return changed

    # -- calls ----------------------------------------------------------------------

    def error(self, exc: Exception) -> Exception:
        """The kdserve error for a Flight error that retrying will not cure."""
        if isinstance(exc, flight.FlightUnauthenticatedError):
            return AuthenticationError(
                f"teacher {self.name!r} at {self.address} refused the token; use the token "
                f"the teacher was started with (token= or {TOKEN_ENV})",
                teacher=self.name,
            )
        return from_flight(exc, self.name, self.address)

    def call(
        self,
        fn: Callable[[], T],
        what: str,
        deadline: float | None = None,
        cancellable: bool = False,
    ) -> T:
        """Run ``fn`` with retries and backoff until it works or the deadline passes
        (``cancellable``: or :meth:`cancel_streams` is called)."""
        delays = backoff(deadline or time.monotonic() + self.connect_timeout, most=_MAX_BACKOFF)
        cancels = self.cancels
        listening_since: float | None = None  # when a teacher that published no token was seen
        while True:
            try:
                return fn()
            except (*TRANSIENT, _NoTokenYetError) as exc:
                delay = next(delays, None)
                if isinstance(exc, _NoTokenYetError) and _listening(self.address):
                    # a teacher publishes its generated token just after it starts
                    # listening: one that has listened a while without it was given a token
                    listening_since = listening_since or time.monotonic()
                    if delay is None or time.monotonic() - listening_since > _TOKEN_GRACE:
                        raise AuthenticationError(
                            _no_token(self.name, self.address), teacher=self.name
                        ) from None
                if delay is None:
                    raise TeacherUnavailableError(
                        f"teacher {self.name!r} at {self.address} did not answer ({what}) for "
                        f"{self.connect_timeout:g} s: is it running, on that port, with TLS on "
                        f"both sides (tls_root_certs=) or on neither? ({reason(exc)})",
                        teacher=self.name,
                    ) from None
                if cancellable:  # a closing student stops waiting for its stream
                    self.check_cancelled(cancels)
                time.sleep(delay)
            except flight.FlightUnauthenticatedError as exc:
                if not self._token_changed():
                    raise self.error(exc) from None
            except flight.FlightError as exc:
                raise self.error(exc) from None
            except pa.ArrowException:
                if self._closed:  # close() from another thread while this call retried
                    raise KdserveError(
                        f"the connection to teacher {self.name!r} was closed (Student.close()) "
                        f"while a call waited for it"
                    ) from None
                raise

    def action(self, kind: str, body: bytes = b"") -> list[bytes]:
        """The results of action ``kind`` with ``body`` (retried; errors as kdserve's)."""

        def run() -> list[bytes]:
            results = self._client.do_action(flight.Action(kind, body), self._options())
            return [r.body.to_pybytes() for r in results]

        return self.call(run, kind)

    def get(self, ticket: Ticket) -> flight.FlightStreamReader:
        """The knowledge stream that answers ``ticket`` (opening it is retried); open
        until :meth:`release`, and cancelled by :meth:`cancel_streams`."""
        request = flight.Ticket(ticket.to_bytes())
        reader = self.call(
            lambda: self._client.do_get(request, self._options()), "knowledge", cancellable=True
        )
        with self._lock:
            self._readers.add(reader)
        return reader

    def exchange(self) -> tuple[flight.FlightStreamWriter, flight.FlightStreamReader]:
        """A query exchange's writer and reader (opening it is retried); the reader is
        cancelled by :meth:`close` (not by :meth:`cancel_streams`, which ends a pass's
        streams) until :meth:`release`."""
        descriptor = flight.FlightDescriptor.for_command(b"query")
        writer, reader = self.call(
            lambda: self._client.do_exchange(descriptor, self._options()), "query"
        )
        with self._lock:
            self._exchanges.add(reader)
        if self._closed:  # closed while it opened
            reader.cancel()
        return writer, reader

    def ping(self) -> None:
        """Check that the teacher answers and takes the token (its service may not run
        yet); waits up to ``connect_timeout`` for it, like every call."""
        self.action("recv", RecvRequest(after=MAX_POSITION).to_bytes())

    def teacher_info(self) -> TeacherInfo:
        """The teacher's name, passes, services and message size limit."""
        (data,) = self.action("info")
        info = TeacherInfo.from_bytes(data, f"info from teacher {self.name!r}")
        self.max_message_bytes = info.max_message_bytes
        self._told_limit = True
        return info

    def _message_limit(self) -> int:
        """The teacher's message size limit (``Limits(message_bytes=)``), asked once (an
        older teacher, which cannot tell, takes the default)."""
        if not self._told_limit:
            try:
                (data,) = self.action("limits")
            except ProtocolError:  # "unknown action": a kdserve before 'limits'
                pass
            else:
                what = f"message limit from teacher {self.name!r}"
                self.max_message_bytes = MessageLimit.from_bytes(data, what).max_message_bytes
            self._told_limit = True
        return self.max_message_bytes

    def schema(self) -> Schema:
        (data,) = self.action("schema")
        return Schema.from_arrow(pa.ipc.read_schema(pa.py_buffer(data)))

    def ack(self, ack: Ack) -> None:
        """Tell the teacher a rank has its batches before a position."""
        self.action("ack", ack.to_bytes())

    # -- messages -------------------------------------------------------------------

    def send(self, student: str, message: Any) -> None:
        """Send ``message`` from ``student``; TypeError/ValueError (nothing sent) for a
        message that cannot be sent, ProtocolError when the teacher refuses it."""
        self.action("send", SendRequest(student, message).to_bytes(max_bytes=self._message_limit()))

    def _physical(self, after: int) -> int:
        """The teacher's index of the message that follows ``after`` decodable ones."""
        index = after
        for dropped in self._dropped:  # sorted
            if dropped <= index:
                index += 1
        return index

    def recv(self, after: int, wait: float) -> list[Any]:
        """The teacher's messages after the first ``after`` (not counting dropped ones),
        waiting up to ``wait`` s for one. A message that cannot be decoded raises
        ProtocolError once, naming the teacher, and is dropped: the next call goes on
        with the messages after it."""
        start = self._physical(after)
        messages: list[Any] = []
        limit = self._message_limit()
        for offset, data in enumerate(self.action("recv", RecvRequest(start, wait).to_bytes())):
            try:
                messages.append(decode_message(data, max_bytes=limit, max_depth=MAX_MESSAGE_DEPTH))
            except ProtocolError as exc:
                if messages:
                    break  # deliver those before it; it is reported on the next call
                self._dropped.append(start + offset)
                self._dropped.sort()
                raise ProtocolError(
                    f"teacher {self.name!r} sent message #{start + offset} that cannot be "
                    f"decoded; it was dropped: {exc}"
                ) from None
        return messages

    # -- knowledge --------------------------------------------------------------------

    def stream_pass(
        self,
        pass_: int,
        rank: int,
        world_size: int,
        ack_every: int,
        shares: list[int] | None = None,
        resumed: Callable[[], None] | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """This rank's batches of pass ``pass_``, resumed across broken connections
        (``resumed()`` called before each resume). At the end of the pass, ``shares`` (if
        given) is set to every rank's rows."""
        return read_pass(self, pass_, rank, world_size, ack_every, shares, resumed)

    def query(
        self, batches: Iterable[pa.RecordBatch], max_in_flight: int
    ) -> Iterator[pa.RecordBatch]:
        """Send input batches, get the knowledge for each, ``max_in_flight`` pipelined."""
        return ask_query.query(self, batches, max_in_flight)


def _listening(address: str) -> bool:
    """Whether something accepts TCP connections at ``address`` (a teacher is running)."""
    parts = split_address(address)
    if parts is None:
        return False
    try:
        socket.create_connection((parts[0].strip("[]"), parts[1]), timeout=0.5).close()
    except OSError:
        return False
    return True


def _no_token(name: str, address: str) -> str:
    """Why a client has no token for ``address``, and where one comes from."""
    text = (
        f"no token for teacher {name!r} at {address}: pass the token the teacher was "
        f"started with (token= or {TOKEN_ENV}; its teacher.token)"
    )
    parts = split_address(address)
    if parts is not None and is_loopback(parts[0]):
        try:
            where = str(token_path(parts[1]))
        except ValueError:
            where = "its token file"
        text += (
            f"; a teacher of this user on this host started without a token publishes it "
            f"in {where}, which is missing or not private"
        )
    return text
