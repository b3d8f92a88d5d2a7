"""The teacher's Arrow Flight server: knowledge streams, acknowledgements, messages, queries.

    get_schema            the knowledge schema (Arrow, with kdserve metadata); also as
                          do_action("schema"), whose errors reach clients intact
    do_get(ticket)        one rank's batches of a pass, from a sequence number on; a batch
                          travels as row slices of at most ``chunk_bytes`` (gRPC slows
                          on large messages), each with app metadata
                          {"pass": p, "seq": s, "part": i, "parts": n}; consecutive small
                          batches that are ready go as one message of up to
                          ``chunk_bytes`` (gRPC's cost is per message), with
                          {"pass": p, "seq": s, "part": 0, "parts": 1, "rows": [r, ...]}
                          giving the rows of batches s, s + world_size, ...
    do_action("ack")      a rank has its batches before a position (frees the window)
    do_action("info")     name, times, what the teacher serves, its message size limit
    do_action("send")     a student's message to the teacher
    do_action("recv")     the teacher's messages after an index (long poll)
    do_exchange("query")  input batches in, knowledge batches out (query mode)

Requests, field by field (JSON objects; any other field, a missing one, a wrong type or
a value out of range is refused):

    ticket  {"pass": 0 <= int < times, "seq": int >= 0, "rank": 0 <= int < world_size,
             "world_size": 1 <= int <= MAX_WORLD_SIZE}; seq % world_size == rank
    ack     the same fields; pass <= times (pass == times: the last pass is over)
    recv    {"after": int >= 0, "wait": number >= 0 (capped at MAX_MESSAGE_WAIT s)}
    send    {"student": str, "message": <a kdserve message>}
    info, schema: no body

Every call carries ``authorization: Bearer <token>``; a wrong or missing token is
refused (the teacher logs it and keeps serving). Handlers raise Flight error types only,
with a one-line reason: a bad request gets "kdserve: <reason>" (the client raises
:class:`~kdserve.errors.ProtocolError`), and any other failure is logged here
(``logging.getLogger("kdserve")``) and reaches the client as one line, so no server
traceback ever does.

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

import functools
import hmac
import json
import logging
import math
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pyarrow as pa
from pyarrow import flight

from kdserve.core.batch import concat_batches
from kdserve.errors import KdserveError, ProtocolError
from kdserve.online.messages import (
    MAX_MESSAGE_BYTES,
    MAX_MESSAGE_DEPTH,
    decode_envelope,
    encode_message,
    load_json,
)
from kdserve.online.replay import ReplayWindow, WindowStoppedError

__all__ = ["TeacherServer", "slice_rows"]

QueryFn = Callable[[pa.RecordBatch], pa.RecordBatch]
F = TypeVar("F", bound=Callable[..., Any])
MAX_MESSAGE_WAIT = 1.0  # seconds one "recv" call may wait for a message
DEFAULT_CHUNK_BYTES = 16 << 20  # a batch travels in slices of about this size (measured best)
DEFAULT_MAX_REQUEST_BYTES = 64 << 10
DEFAULT_MAX_MESSAGE_BYTES = MAX_MESSAGE_BYTES
DEFAULT_MAX_INBOX_BYTES = 64 << 20
DEFAULT_MAX_QUERY_BYTES = 256 << 20
MAX_WORLD_SIZE = 1 << 16  # data-parallel ranks a ticket may name
MAX_POSITION = (1 << 53) - 1  # pass, seq and message indices (exact in any JSON reader)
MAX_REQUEST_DEPTH = 4  # tickets, acks and recv requests are flat objects
RECV_BATCH_BYTES = 16 << 20  # messages one "recv" answer carries at most (at least one)
MAX_ACTION_NAME = 64

log = logging.getLogger("kdserve")


def _line(text: str, limit: int = 300) -> str:
    """``text`` on one line, at most ``limit`` characters: safe to send as a reason."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _short(value: object, limit: int = 60) -> str:
    """A peer's value quoted for an error message, cut short."""
    return _line(repr(value), limit)


class _TokenCheck(flight.ServerMiddlewareFactory):  # type: ignore[misc]
    """Refuses calls without ``authorization: Bearer <token>``; logs each refusal."""

    def __init__(self, token: str, teacher: str) -> None:
        super().__init__()
        self._expected = f"Bearer {token}".encode()
        self._teacher = teacher

    def start_call(self, info: Any, headers: dict[str, list[Any]]) -> None:
        given = headers.get("authorization") or []
        value = given[0] if given else b""
        if isinstance(value, str):
            value = value.encode("utf-8", "replace")
        if not isinstance(value, bytes) or not hmac.compare_digest(value, self._expected):
            print(
                f"[kdserve] teacher {self._teacher}: refused a {info.method} call with a "
                f"{'wrong' if given else 'missing'} token",
                file=sys.stderr,
            )
            raise flight.FlightUnauthenticatedError(
                f"teacher {self._teacher!r} refused the token: pass the token the teacher "
                f"printed or was given (token= or KDSERVE_TOKEN)"
            )


# -- request validation ----------------------------------------------------------------


def _spec(data: bytes, what: str, required: set[str], optional: set[str], limit: int) -> Any:
    """A request body: a flat JSON object with ``required`` and maybe ``optional`` keys."""
    value = load_json(data, what, max_bytes=limit, max_depth=MAX_REQUEST_DEPTH)
    if not isinstance(value, dict):
        raise ProtocolError(f"bad {what}: not a JSON object")
    missing = sorted(required - set(value))
    unknown = sorted(set(value) - required - optional)
    if missing or unknown:
        raise ProtocolError(
            f"bad {what}: "
            + "; ".join(
                [f"missing {', '.join(missing)}"] * bool(missing)
                + [f"unknown field(s) {_short(unknown)}"] * bool(unknown)
            )
            + f" (it takes {', '.join(sorted(required | optional))})"
        )
    return value


def _int(spec: dict[str, Any], key: str, what: str, low: int, high: int) -> int:
    """``spec[key]``, an integer (not a bool) in ``[low, high]``."""
    value = spec[key]
    if type(value) is not int:
        raise ProtocolError(f"bad {what}: {key} must be an integer, got {_short(value)}")
    if not low <= value <= high:
        raise ProtocolError(f"bad {what}: {key}={_short(value)} is outside [{low}, {high}]")
    return value


def _position_spec(data: bytes, what: str, limit: int, last_pass: int) -> tuple[int, ...]:
    """``(pass, seq, rank, world_size)`` of a ticket or an ack, each in range."""
    spec = _spec(data, what, {"pass", "seq", "rank", "world_size"}, set(), limit)
    world = _int(spec, "world_size", what, 1, MAX_WORLD_SIZE)
    rank = _int(spec, "rank", what, 0, world - 1)
    pass_ = _int(spec, "pass", what, 0, last_pass)
    seq = _int(spec, "seq", what, 0, MAX_POSITION)
    if seq % world != rank:
        raise ProtocolError(f"bad {what}: batch {seq} does not belong to rank {rank} of {world}")
    return pass_, seq, rank, world


def _guarded(method: F) -> F:
    """A Flight handler whose failures reach the client as one-line Flight errors: bad
    requests as "kdserve: ...", anything unexpected logged here and named briefly."""

    @functools.wraps(method)
    def run(self: TeacherServer, context: Any, *args: Any) -> Any:
        try:
            return method(self, context, *args)
        except BaseException as exc:
            raise self._flight_error(exc, method.__name__, context) from None

    return run  # type: ignore[return-value]


class _Inbox(queue.Queue[tuple[str, Any]]):
    """Students' messages not yet received by the teacher, at most ``max_bytes`` of them."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.bytes = 0
        self._sizes: deque[int] = deque()

    def offer(self, item: tuple[str, Any], nbytes: int) -> bool:
        """Queue ``item`` unless that would pass ``max_bytes`` (one message always fits)."""
        with self.mutex:
            if self._sizes and self.bytes + nbytes > self.max_bytes:
                return False
            self.queue.append(item)
            self._sizes.append(nbytes)
            self.bytes += nbytes
            self.unfinished_tasks += 1
            self.not_empty.notify()
        return True

    def _put(self, item: tuple[str, Any]) -> None:
        super()._put(item)
        self._sizes.append(0)

    def _get(self) -> tuple[str, Any]:
        self.bytes -= self._sizes.popleft()
        return super()._get()


class TeacherServer(flight.FlightServerBase):  # type: ignore[misc]
    """Serves one teacher's knowledge. Listens from construction until :meth:`close`.

    ``tls`` is the server's (cert, key) PEM pair; with ``tls_client_ca`` (PEM) too,
    clients must present a certificate signed by that CA (mutual TLS), checked in the
    TLS handshake before any request is read. The ``max_*`` limits are described in the
    module docstring.
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
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_inbox_bytes: int = DEFAULT_MAX_INBOX_BYTES,
        max_query_bytes: int = DEFAULT_MAX_QUERY_BYTES,
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
        if tls_client_ca is not None and tls is None:
            raise KdserveError("tls_client_ca (mutual TLS) needs tls=(cert, key) as well")
        scheme = "grpc+tls" if tls else "grpc"
        mutual: dict[str, Any] = {}
        if tls_client_ca is not None:
            mutual = {"verify_client": True, "root_certificates": tls_client_ca}
        try:
            super().__init__(
                f"{scheme}://{host}:{port}",
                tls_certificates=[tls] if tls else None,
                middleware={"auth": _TokenCheck(token, name)},
                **mutual,
            )
        except (pa.ArrowException, OSError) as exc:
            raise KdserveError(
                f"teacher {name!r} cannot listen on {host}:{port} ({exc}); the port may be "
                f"taken: choose another out_port, or stop the process using it"
            ) from None
        self.name = name
        self.chunk_bytes = chunk_bytes
        self.max_request_bytes = max_request_bytes
        self.max_message_bytes = max_message_bytes
        self.max_query_bytes = max_query_bytes
        self.schema = schema
        self.window = window
        self.query = query
        self._outbox: list[bytes] = []
        self._outbox_changed = threading.Condition()
        self.inbox: _Inbox = _Inbox(max_inbox_bytes)

    # -- errors -----------------------------------------------------------------------

    def _flight_error(self, exc: BaseException, where: str, context: Any) -> BaseException:
        """The Flight error a client gets for ``exc``, raised in handler ``where``."""
        error: BaseException
        if isinstance(exc, flight.FlightError) or not isinstance(exc, Exception):
            error = exc  # ours already; or GeneratorExit, KeyboardInterrupt: not ours to eat
        elif isinstance(exc, WindowStoppedError):
            error = flight.FlightUnavailableError(
                f"kdserve: teacher {self.name!r}: {_line(str(exc))}"
            )
        elif isinstance(exc, KdserveError):  # a request this teacher refuses
            error = flight.FlightServerError(f"kdserve: {_line(str(exc))}")
        elif isinstance(exc, pa.ArrowException) and _cancelled(context):
            log.debug("teacher %s: %s cancelled by %s: %s", self.name, where, _peer(context), exc)
            error = flight.FlightCancelledError(f"kdserve: the {where} call was cancelled")
        else:
            log.error(
                "teacher %s: %s from %s failed", self.name, where, _peer(context), exc_info=exc
            )
            error = flight.FlightServerError(
                f"kdserve internal: teacher {self.name!r} failed on a {where} call "
                f"({type(exc).__name__}); the teacher's log has the details"
            )
        return error

    # -- knowledge stream -----------------------------------------------------------

    def _check_ready(self) -> None:
        """Until the service has started (and a stream's schema is known), calls are refused
        as unavailable, which clients retry: a student may connect before its teacher
        runs start_knowledge_service without taking it for a query-only teacher."""
        if (self.window is None and self.query is None) or (
            self.window is not None and self.schema is None
        ):
            raise flight.FlightUnavailableError(
                f"kdserve: teacher {self.name!r} has not started its knowledge service yet"
            )

    @_guarded
    def get_schema(self, context: Any, descriptor: Any) -> flight.SchemaResult:
        self._check_ready()
        if self.schema is None:
            raise flight.FlightServerError(
                f"kdserve: teacher {self.name!r} serves queries only; it has no knowledge stream"
            )
        return flight.SchemaResult(self.schema)

    @_guarded
    def do_get(self, context: Any, ticket: flight.Ticket) -> flight.FlightDataStream:
        data = ticket.ticket
        if len(data) > self.max_request_bytes:
            raise ProtocolError(
                f"bad ticket: {len(data)} bytes, over the limit of {self.max_request_bytes}"
            )
        self._check_ready()
        if self.window is None or self.schema is None:
            raise flight.FlightServerError(f"kdserve: teacher {self.name!r} serves queries only")
        window, schema = self.window, self.schema
        pass_, seq, rank, world = _position_spec(
            data, "ticket", self.max_request_bytes, MAX_POSITION
        )
        batches = window.stream(pass_, seq, rank, world)
        first = next(batches, None)  # validate now: errors reach the client as errors

        def stream() -> Iterator[tuple[pa.RecordBatch, pa.Buffer]]:
            items = batches if first is None else _chain(first, batches)
            group: list[tuple[int, pa.RecordBatch]] = []  # small batches sent as one message
            end = seq  # the rank's next batch; past its last one when the pass is over
            for s, batch in items:
                end = s + world
                if batch.nbytes >= self.chunk_bytes:
                    yield from _message(pass_, group)
                    group = []
                    parts = slice_rows(batch, self.chunk_bytes)
                    for i, part in enumerate(parts):
                        meta = {"pass": pass_, "seq": s, "part": i, "parts": len(parts)}
                        yield part, pa.py_buffer(json.dumps(meta).encode())
                    continue
                group.append((s, batch))
                full = sum(b.nbytes for _, b in group) >= self.chunk_bytes
                if full or not window.ready(pass_, s + world):
                    yield from _message(pass_, group)  # never wait with batches held
                    group = []
            yield from _message(pass_, group)
            # The pass is over for this rank: an empty batch tells it every rank's rows, so
            # that data-parallel students can even their shares.
            shares = window.rank_rows(pass_, world, 0.0) or []
            end_meta = {"pass": pass_, "seq": end, "part": 0, "parts": 1, "shares": shares}
            # (pa.nulls, not from_pylist: that would import pandas, ~0.2 s, mid-stream)
            empty = pa.RecordBatch.from_arrays([pa.nulls(0, f.type) for f in schema], schema=schema)
            yield empty, pa.py_buffer(json.dumps(end_meta).encode())

        # A stopped window mid-stream is not a normal end: the student must not take it
        # for the end of the pass (it gets "unavailable" and asks again).
        return flight.GeneratorStream(self.schema, self._guard_stream(stream(), context))

    def _guard_stream(self, items: Iterator[Any], context: Any) -> Iterator[Any]:
        """``items``, with any failure while streaming turned into a one-line Flight error."""
        try:
            yield from items
        except BaseException as exc:
            raise self._flight_error(exc, "do_get", context) from None

    @_guarded
    def do_put(self, context: Any, descriptor: Any, reader: Any, writer: Any) -> None:
        raise flight.FlightServerError(f"kdserve: teacher {self.name!r} takes no uploads")

    @_guarded
    def list_flights(self, context: Any, criteria: Any) -> Iterator[Any]:
        raise flight.FlightServerError(f"kdserve: teacher {self.name!r} lists no flights")

    @_guarded
    def get_flight_info(self, context: Any, descriptor: Any) -> Any:
        raise flight.FlightServerError(f"kdserve: teacher {self.name!r} has no flight info")

    # -- actions --------------------------------------------------------------------

    @_guarded
    def list_actions(self, context: Any) -> list[tuple[str, str]]:
        return [
            ("ack", "a rank has its batches before a position"),
            ("info", "the teacher's name, passes and services"),
            ("schema", "the knowledge schema, Arrow IPC serialized"),
            ("send", "a student's message to the teacher"),
            ("recv", "the teacher's messages after an index"),
        ]

    @_guarded
    def do_action(self, context: Any, action: flight.Action) -> Iterator[flight.Result]:
        kind, body = action.type, action.body  # body: a zero-copy view, checked before use
        if len(kind) > MAX_ACTION_NAME:
            raise ProtocolError(f"unknown action {_short(kind)}")
        size = body.size if body is not None else 0
        limit = self.max_request_bytes
        if kind == "send":
            limit = self.max_message_bytes + self.max_request_bytes  # the envelope's room
        if size > limit:
            raise ProtocolError(f"bad {kind} request: {size} bytes, over the limit of {limit}")
        data = body.to_pybytes() if size else b""
        if kind in ("info", "schema") and data:
            raise ProtocolError(f"bad {kind} request: it takes no body")
        if kind == "info":
            self._check_ready()
            info = {
                "name": self.name,
                "times": self.window.times if self.window else 0,
                "buf_size": self.window.buf_size if self.window else 0,
                "stream": self.window is not None,
                "query": self.query is not None,
                "max_message_bytes": self.max_message_bytes,
            }
            return iter([flight.Result(json.dumps(info).encode())])
        if kind == "schema":  # an action, not get_schema: its errors reach clients intact
            self._check_ready()
            if self.schema is None:
                raise flight.FlightServerError(
                    f"kdserve: teacher {self.name!r} serves queries only; it has no knowledge "
                    f"stream"
                )
            return iter([flight.Result(self.schema.serialize())])
        if kind == "ack":
            last = self.window.times if self.window else MAX_POSITION
            pass_, seq, rank, world = _position_spec(data, "ack", limit, last)
            if self.window is not None:
                self.window.ack(rank, world, (pass_, seq))
            return iter([])
        if kind == "send":
            self._receive(data, context)
            return iter([])
        if kind == "recv":
            return iter([flight.Result(m) for m in self._messages_after(data)])
        raise ProtocolError(f"unknown action {_short(kind)}")

    def _receive(self, data: bytes, context: Any) -> None:
        """Queue a student's message for the teacher, or refuse it (logged, naming the
        sender): a bad message never reaches, or stops, the teacher's ``recv``."""
        try:
            sender, message = decode_envelope(
                data, max_bytes=self.max_message_bytes, max_depth=MAX_MESSAGE_DEPTH
            )
        except ProtocolError as exc:
            log.warning("teacher %s: dropped a message from %s: %s", self.name, _peer(context), exc)
            raise ProtocolError(f"message refused and dropped: {exc}") from None
        if not self.inbox.offer((sender, message), len(data)):
            raise flight.FlightUnavailableError(
                f"kdserve: teacher {self.name!r} has {self.inbox.bytes} bytes of messages it "
                f"has not received yet; try again later"
            )

    def _messages_after(self, data: bytes) -> list[bytes]:
        """The teacher's messages from index ``after`` on (long poll: up to ``wait`` s)."""
        spec = _spec(data, "recv request", set(), {"after", "wait"}, self.max_request_bytes)
        after = _int(spec, "after", "recv request", 0, MAX_POSITION) if "after" in spec else 0
        wait = spec.get("wait", 0)
        if type(wait) not in (int, float) or not math.isfinite(wait) or wait < 0:
            raise ProtocolError(
                f"bad recv request: wait must be a number of seconds >= 0, got {_short(wait)}"
            )
        deadline = time.monotonic() + min(float(wait), MAX_MESSAGE_WAIT)
        with self._outbox_changed:
            while len(self._outbox) <= after and time.monotonic() < deadline:
                self._outbox_changed.wait(max(0.0, deadline - time.monotonic()))
            fresh: list[bytes] = []
            total = 0
            for message in self._outbox[after:]:
                if fresh and total + len(message) > RECV_BATCH_BYTES:
                    break  # the rest comes with the next recv
                fresh.append(message)
                total += len(message)
        return fresh

    def broadcast(self, message: Any) -> None:
        """Queue a message every student can ``recv`` (numbered from 0 in sending order).
        TypeError/ValueError, and nothing queued, for a message that cannot be sent."""
        data = encode_message(message, max_bytes=self.max_message_bytes)
        with self._outbox_changed:
            self._outbox.append(data)
            self._outbox_changed.notify_all()

    # -- query mode -----------------------------------------------------------------

    @_guarded
    def do_exchange(
        self, context: Any, descriptor: flight.FlightDescriptor, reader: Any, writer: Any
    ) -> None:
        if self.query is None:
            raise flight.FlightServerError(
                f"kdserve: teacher {self.name!r} does not answer queries"
            )
        if descriptor.command != b"query":
            raise ProtocolError(f"bad exchange: the command is {_short(descriptor.command)}")
        started = False
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                return
            except pa.ArrowInvalid as exc:  # not Arrow IPC, or a batch off its schema
                raise ProtocolError(f"bad query batch: {_line(str(exc), 200)}") from None
            if chunk.data is None:
                continue
            if chunk.data.nbytes > self.max_query_bytes:
                raise ProtocolError(
                    f"query refused: a batch of {chunk.data.nbytes} bytes, over the limit of "
                    f"{self.max_query_bytes}; send smaller batches"
                )
            try:
                result = self.query(chunk.data)
            except KdserveError as exc:
                raise ProtocolError(f"query refused: {_line(str(exc))}") from None
            except Exception as exc:  # the program's own error: logged here, named there
                log.error("teacher %s: the program failed on a query", self.name, exc_info=exc)
                raise flight.FlightServerError(
                    f"kdserve: teacher {self.name!r}'s program failed on a query: "
                    f"{type(exc).__name__}: {_line(str(exc), 200)}"
                ) from None
            if not started:
                writer.begin(result.schema)
                started = True
            writer.write_batch(result)


def _cancelled(context: Any) -> bool:
    """Whether the client went away (its call's failures are then no teacher's fault)."""
    try:
        return bool(context.is_cancelled())
    except Exception:
        return False


def _peer(context: Any) -> str:
    """Who called, for the log (a gRPC peer such as ``ipv4:127.0.0.1:50412``)."""
    try:
        return str(context.peer())
    except Exception:
        return "an unknown peer"


def slice_rows(batch: pa.RecordBatch, chunk_bytes: int) -> list[pa.RecordBatch]:
    """``batch`` as zero-copy row slices of about ``chunk_bytes`` each (at least one row)."""
    rows = batch.num_rows
    if rows <= 1 or batch.nbytes <= chunk_bytes:
        return [batch]
    step = max(1, rows * chunk_bytes // batch.nbytes)
    return [batch.slice(start, step) for start in range(0, rows, step)]


def _message(
    pass_: int, group: list[tuple[int, pa.RecordBatch]]
) -> Iterator[tuple[pa.RecordBatch, pa.Buffer]]:
    """``group`` (consecutive batches of one rank) as one Flight message, if not empty."""
    if not group:
        return
    meta: dict[str, Any] = {"pass": pass_, "seq": group[0][0], "part": 0, "parts": 1}
    if len(group) > 1:
        meta["rows"] = [b.num_rows for _, b in group]
    yield concat_batches([b for _, b in group]), pa.py_buffer(json.dumps(meta).encode())


def _chain(
    first: tuple[int, pa.RecordBatch], rest: Iterator[tuple[int, pa.RecordBatch]]
) -> Iterator[tuple[int, pa.RecordBatch]]:
    yield first
    yield from rest
