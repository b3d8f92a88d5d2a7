"""The teacher's Arrow Flight server: knowledge streams, acknowledgements, messages, queries.

    get_schema            the knowledge schema (Arrow, with kdserve metadata); also as
                          do_action("schema"), whose errors reach clients intact
    do_get(Ticket)        one rank's batches of a pass, from a sequence number on
                          (:mod:`kdserve.online.serve_pass`)
    do_action("ack")      an Ack: a rank has its batches before a position (frees the window)
    do_action("info")     TeacherInfo: name, times, what the teacher serves, its message limit,
                          its kdserve version, model and provenance
    do_action("limits")   MessageLimit: its message limit (before its service starts too)
    do_action("send")     a SendRequest: a student's message to the teacher
    do_action("recv")     a RecvRequest: the teacher's messages after an index (long poll)
    do_exchange("query")  input batches in, knowledge batches out (query mode)

Requests and replies are the typed, versioned values of :mod:`kdserve.online.protocol`,
checked field by field there. Every call carries ``authorization: Bearer <token>``; a
wrong or missing token is refused (the teacher logs it and keeps serving). Failures reach
the client as one-line Flight errors carrying the kdserve exception's kind and message
(:mod:`kdserve.online.guard`), so no server traceback ever does.

Size limits (``TeacherServer`` arguments):

    max_request_bytes   64 KiB  a ticket or the body of ack/recv/info/schema: JSON of a
                                few numbers (under 200 bytes); the room is for future fields
    max_message_bytes    4 MiB  a message, either way (``kdserve.online.messages``); students
                                learn it from ``info``
    max_inbox_bytes     64 MiB  messages students sent that the teacher has not received:
                                beyond it "send" is refused as unavailable (students retry)
    max_query_bytes    256 MiB  one input batch of a query: a large image batch
                                (256 x 3 x 224 x 224 float32 is 154 MB) fits, and it stays
                                far below gRPC's 2 GiB message ceiling

What the limits bound, and what they cannot: the token is checked in middleware, before
the handler runs. For the streaming calls (do_put, do_exchange) nothing of the body is
read before that check: an unauthenticated client cannot make the teacher hold its
request (measured: +0 MB of peak RSS for a 300 MB request). For the calls whose request
is one message (do_action, do_get, get_schema, get_flight_info, list_flights), gRPC
receives the whole message before any middleware or handler runs, and pyarrow gives no
way to bound it: Arrow's gRPC server calls ``SetMaxReceiveMessageSize(-1)``, pyarrow's
``FlightServerBase`` exposes no server options (no ``builder_hook``, no channel
arguments), no environment variable of gRPC core sets the limit, and gRPC itself
enforces ``grpc.max_receive_message_length`` only once the message is buffered
(grpc/grpc#43012). A 300 MB do_action body without a token raises the teacher's peak RSS
by about 700 MB before it is refused. What this module does: it never copies a body into
Python before checking its size (``action.body`` is a zero-copy buffer), and it offers
mutual TLS (``tls_client_ca``): a client without a certificate from that CA is refused
during the TLS handshake, before any HTTP/2 frame, so an unauthenticated peer makes the
teacher hold nothing (measured: +0 MB). Use it for a teacher reachable beyond loopback.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa
from pyarrow import flight

from kdserve.errors import KdserveError, ProtocolError, TeacherUnavailableError
from kdserve.online.guard import TokenCheck, guard_stream, guarded, peer
from kdserve.online.limits import DEFAULT_MAX_INBOX_BYTES
from kdserve.online.mailbox import Inbox, Outbox
from kdserve.online.messages import MAX_MESSAGE_BYTES, MAX_MESSAGE_DEPTH
from kdserve.online.protocol import (
    MAX_POSITION,
    MAX_REQUEST_BYTES,
    MAX_WORLD_SIZE,
    Ack,
    MessageLimit,
    RecvRequest,
    SendRequest,
    TeacherInfo,
    Ticket,
)
from kdserve.online.replay import ReplayWindow
from kdserve.online.serve_pass import pass_messages
from kdserve.online.serve_query import DEFAULT_MAX_QUERY_BYTES, QueryFn, answer_queries
from kdserve.online.wire import quote

__all__ = ["DEFAULT_CHUNK_BYTES", "MAX_POSITION", "MAX_WORLD_SIZE", "TeacherServer"]

MAX_MESSAGE_WAIT = 1.0  # seconds one "recv" call may wait for a message
DEFAULT_CHUNK_BYTES = 16 << 20  # a batch travels in slices of about this size (measured best)
MAX_ACTION_NAME = 64
_ACTIONS = [
    ("ack", "a rank has its batches before a position"),
    ("info", "the teacher's name, passes and services"),
    ("limits", "the largest message the teacher takes and sends"),
    ("schema", "the knowledge schema, Arrow IPC serialized"),
    ("send", "a student's message to the teacher"),
    ("recv", "the teacher's messages after an index"),
]
log = logging.getLogger(__name__)


class _Listening:
    """This process's servers, from listen to shutdown (by id), and whether the process
    was forked from one that had some."""

    def __init__(self) -> None:
        self.servers: set[int] = set()
        self.lock = threading.Lock()
        self.forked_from_server = False

    def after_fork_in_child(self) -> None:
        """The child has no server (fork copies no thread) and new locks."""
        self.forked_from_server |= bool(self.servers)
        self.servers = set()
        self.lock = threading.Lock()


_LISTENING = _Listening()
os.register_at_fork(after_in_child=_LISTENING.after_fork_in_child)


def check_not_forked_from_server(teacher: str) -> None:
    """KdserveError in a process forked from one serving a teacher: gRPC's threads do not
    survive fork, and any call it makes would hang (a DataLoader worker forked from a
    process that runs ``kd.serve``, say)."""
    if _LISTENING.forked_from_server:
        raise KdserveError(
            f"cannot connect to teacher {teacher!r} from a process forked from one that "
            f"serves a teacher (gRPC does not survive fork: the call would hang). Start "
            f"DataLoader workers with multiprocessing_context='spawn', read with "
            f"num_workers=0, or serve the teacher from another process"
        )


class TeacherServer(flight.FlightServerBase):  # type: ignore[misc]
    """Serves one teacher's knowledge. Listens from construction until :meth:`shutdown`.

    ``schema`` (the knowledge stream's Arrow schema), ``window`` (its replay window) and
    ``query`` (the query function) may be given later (:meth:`set_schema`, :meth:`attach`,
    :meth:`answer_queries`): until a window or a query function is there, calls are
    refused as unavailable, which students retry. ``tls`` is the server's (cert, key) PEM
    pair; with ``tls_client_ca`` (PEM) too, clients must present a certificate signed by
    that CA (mutual TLS), checked in the TLS handshake before any request is read. The
    ``max_*`` limits are described in the module docstring. ``model`` and ``provenance``
    (checked by the :class:`~kdserve.Teacher`) are reported in the teacher's info.
    """

    def __init__(
        self,
        *,
        name: str,
        host: str,
        port: int,
        token: str,
        schema: pa.Schema | None,
        window: ReplayWindow | None,
        query: QueryFn | None,
        tls: tuple[bytes, bytes] | None = None,
        tls_client_ca: bytes | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_inbox_bytes: int = DEFAULT_MAX_INBOX_BYTES,
        max_query_bytes: int = DEFAULT_MAX_QUERY_BYTES,
        model: str | None = None,
        provenance: Mapping[str, str | int | float | bool] | None = None,
    ) -> None:
        limits = {
            "max_request_bytes": max_request_bytes,
            "max_message_bytes": max_message_bytes,
            "max_inbox_bytes": max_inbox_bytes,
            "max_query_bytes": max_query_bytes,
            "chunk_bytes": chunk_bytes,
        }
        for key, value in limits.items():
            if type(value) is not int or value < 1:
                raise ValueError(f"{key} must be a positive number of bytes, got {value!r}")
        if type(port) is not int or not 0 <= port < 1 << 16:
            raise ValueError(
                f"out_port must be an int in 0..65535 (0: any free port), got {port!r}"
            )
        if tls_client_ca is not None and tls is None:
            raise KdserveError("tls_client_ca (mutual TLS) needs tls=(cert, key) as well")
        scheme = "grpc+tls" if tls else "grpc"
        mutual: dict[str, Any] = {}
        if tls_client_ca is not None:
            mutual = {"verify_client": True, "root_certificates": tls_client_ca}
        self.name = name
        try:
            super().__init__(
                f"{scheme}://{host}:{port}",
                tls_certificates=[tls] if tls else None,
                middleware={"auth": TokenCheck(token, lambda: self.name)},
                **mutual,
            )
        except (pa.ArrowException, OSError) as exc:
            why = "is the port taken (choose another out_port, or stop the process using it)"
            if tls:
                why += ", or are tls_cert/tls_key not a PEM certificate and its private key"
            raise KdserveError(
                f"teacher {name!r} cannot listen on {host}:{port} ({exc}): {why}?"
            ) from None
        self.chunk_bytes = chunk_bytes
        self.max_request_bytes = max_request_bytes
        self.max_message_bytes = max_message_bytes
        self.max_query_bytes = max_query_bytes
        self.schema = schema
        self.window = window
        self.query = query
        self.model = model
        self.provenance = dict(provenance or {})
        self.inbox = Inbox(max_inbox_bytes)
        self._outbox = Outbox(max_message_bytes)
        with _LISTENING.lock:
            _LISTENING.servers.add(id(self))

    def shutdown(self) -> None:
        """Stop listening, once the calls in progress end (Flight's own shutdown)."""
        try:
            super().shutdown()
        finally:
            with _LISTENING.lock:
                _LISTENING.servers.discard(id(self))

    def set_schema(self, schema: pa.Schema) -> None:
        """The knowledge stream's Arrow schema, once the teacher knows it."""
        self.schema = schema

    def attach(self, window: ReplayWindow) -> None:
        """Serve the knowledge stream of ``window``."""
        self.window = window

    def answer_queries(self, query: QueryFn) -> None:
        """Answer queries with ``query``: a batch of a student's inputs -> its knowledge."""
        self.query = query

    def broadcast(self, message: Any) -> None:
        """Queue a message every student can ``recv`` (numbered from 0 in sending order).
        TypeError/ValueError, and nothing queued, for a message that cannot be sent."""
        self._outbox.broadcast(message)

    # -- knowledge stream -----------------------------------------------------------

    def _check_ready(self) -> None:
        """Until the service has started (and a stream's schema is known), calls are refused
        as unavailable, which clients retry: a student may connect before its teacher
        runs start_knowledge_service without taking it for a query-only teacher."""
        if (self.window is None and self.query is None) or (
            self.window is not None and self.schema is None
        ):
            raise TeacherUnavailableError(
                f"teacher {self.name!r} has not started its knowledge service yet",
                teacher=self.name,
            )

    def _stream_schema(self) -> pa.Schema:
        """The knowledge stream's schema; ProtocolError for a query-only teacher."""
        self._check_ready()
        if self.schema is None or self.window is None:  # a query's answer sets the schema
            raise ProtocolError(
                f"teacher {self.name!r} serves queries only; it has no knowledge stream"
            )
        return self.schema

    @guarded
    def get_schema(self, context: Any, descriptor: Any) -> flight.SchemaResult:
        return flight.SchemaResult(self._stream_schema())

    @guarded
    def do_get(self, context: Any, ticket: flight.Ticket) -> flight.FlightDataStream:
        data = ticket.ticket
        if len(data) > self.max_request_bytes:
            raise ProtocolError(
                f"bad ticket: {len(data)} bytes, over the limit of {self.max_request_bytes}"
            )
        schema, window = self._stream_schema(), self.window
        assert window is not None  # a stream's schema is only known with its window
        request = Ticket.from_bytes(data, max_bytes=self.max_request_bytes)
        messages = pass_messages(window, schema, request, self.chunk_bytes)
        # A stopped window mid-stream is not a normal end: the student must not take it
        # for the end of the pass (it gets "unavailable" and asks again).
        return flight.GeneratorStream(schema, guard_stream(messages, self.name, "do_get", context))

    @guarded
    def do_put(self, context: Any, descriptor: Any, reader: Any, writer: Any) -> None:
        raise ProtocolError(f"teacher {self.name!r} takes no uploads")

    @guarded
    def list_flights(self, context: Any, criteria: Any) -> Iterator[Any]:
        raise ProtocolError(f"teacher {self.name!r} lists no flights")

    @guarded
    def get_flight_info(self, context: Any, descriptor: Any) -> Any:
        raise ProtocolError(f"teacher {self.name!r} has no flight info")

    # -- actions --------------------------------------------------------------------

    @guarded
    def list_actions(self, context: Any) -> list[tuple[str, str]]:
        return _ACTIONS

    @guarded
    def do_action(self, context: Any, action: flight.Action) -> Iterator[flight.Result]:
        kind, body = action.type, action.body  # body: a zero-copy view, checked before use
        if len(kind) > MAX_ACTION_NAME:
            raise ProtocolError(f"unknown action {quote(kind)}")
        size = body.size if body is not None else 0
        limit = self.max_request_bytes
        if kind == "send":
            limit = self.max_message_bytes + self.max_request_bytes  # the envelope's room
        if size > limit:
            raise ProtocolError(f"bad {kind} request: {size} bytes, over the limit of {limit}")
        data = body.to_pybytes() if size else b""
        if kind in ("info", "limits", "schema") and data:
            raise ProtocolError(f"bad {kind} request: it takes no body")
        if kind == "limits":  # before the service too: messages may come first
            return iter([flight.Result(MessageLimit(self.max_message_bytes).to_bytes())])
        if kind == "info":
            self._check_ready()
            return iter([flight.Result(self._info().to_bytes())])
        if kind == "schema":  # an action, not get_schema: its errors reach clients intact
            return iter([flight.Result(self._stream_schema().serialize())])
        if kind == "ack":
            last = self.window.times if self.window else MAX_POSITION
            ack = Ack.from_bytes(data, max_bytes=limit, last_pass=last)
            if self.window is not None:
                self.window.ack(ack.rank, ack.world_size, (ack.pass_, ack.seq))
            return iter([])
        if kind == "send":
            self._receive(data, context)
            return iter([])
        if kind == "recv":
            request = RecvRequest.from_bytes(data, max_bytes=limit)
            found = self._outbox.after(request.after, min(request.wait, MAX_MESSAGE_WAIT))
            return iter([flight.Result(m) for m in found])
        raise ProtocolError(f"unknown action {quote(kind)}")

    def _info(self) -> TeacherInfo:
        return TeacherInfo(
            name=self.name,
            times=self.window.times if self.window else 0,
            buf_size=self.window.buf_size if self.window else 0,
            stream=self.window is not None,
            query=self.query is not None,
            max_message_bytes=self.max_message_bytes,
            model=self.model,
            provenance=self.provenance,
        )

    def _receive(self, data: bytes, context: Any) -> None:
        """Queue a student's message for the teacher, or refuse it (logged, naming the
        sender): a bad message never reaches, or stops, the teacher's ``recv``."""
        try:
            request = SendRequest.from_bytes(
                data, max_bytes=self.max_message_bytes, max_depth=MAX_MESSAGE_DEPTH
            )
        except ProtocolError as exc:
            log.warning("teacher %s: dropped a message from %s: %s", self.name, peer(context), exc)
            raise ProtocolError(f"message refused and dropped: {exc}") from None
        if not self.inbox.offer((request.student, request.message), len(data)):
            raise TeacherUnavailableError(
                f"teacher {self.name!r} has {self.inbox.bytes} bytes of messages it has not "
                f"received yet; try again later",
                teacher=self.name,
            )

    # -- query mode -----------------------------------------------------------------

    @guarded
    def do_exchange(
        self, context: Any, descriptor: flight.FlightDescriptor, reader: Any, writer: Any
    ) -> None:
        if self.query is None:
            raise ProtocolError(f"teacher {self.name!r} does not answer queries")
        if descriptor.command != b"query":
            raise ProtocolError(f"bad exchange: the command is {quote(descriptor.command)}")
        answer_queries(self.query, reader, writer, self.max_query_bytes, self.name)
