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
    do_action("info")     name, times, what the teacher serves
    do_action("send")     a student's message to the teacher
    do_action("recv")     the teacher's messages after an index (long poll)
    do_exchange("query")  input batches in, knowledge batches out (query mode)

Every call carries ``authorization: Bearer <token>``; a wrong or missing token is
refused (the teacher logs it and keeps serving). Handlers raise Flight error types only,
so no server traceback reaches a client.
"""

from __future__ import annotations

import hmac
import json
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
from pyarrow import flight

from kdserve.batch import concat_batches
from kdserve.errors import KdserveError, ProtocolError
from kdserve.messages import decode_message, encode_message
from kdserve.replay import ReplayWindow, WindowStoppedError

__all__ = ["TeacherServer", "slice_rows"]

QueryFn = Callable[[pa.RecordBatch], pa.RecordBatch]
MAX_MESSAGE_WAIT = 1.0  # seconds one "recv" call may wait for a message
DEFAULT_CHUNK_BYTES = 16 << 20  # a batch travels in slices of about this size (measured best)


class _TokenCheck(flight.ServerMiddlewareFactory):  # type: ignore[misc]
    """Refuses calls without ``authorization: Bearer <token>``; logs each refusal."""

    def __init__(self, token: str, teacher: str) -> None:
        super().__init__()
        self._expected = f"Bearer {token}".encode()
        self._teacher = teacher

    def start_call(self, info: Any, headers: dict[str, list[Any]]) -> None:
        given = headers.get("authorization") or []
        value = given[0] if given else ""
        if isinstance(value, str):
            value = value.encode()
        if not hmac.compare_digest(value, self._expected):
            print(
                f"[kdserve] teacher {self._teacher}: refused a {info.method} call with a "
                f"{'wrong' if given else 'missing'} token",
                file=sys.stderr,
            )
            raise flight.FlightUnauthenticatedError(
                f"teacher {self._teacher!r} refused the token: pass the token the teacher "
                f"printed or was given (token= or KDSERVE_TOKEN)"
            )


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise flight.FlightServerError(f"kdserve: bad {what}: not JSON") from None
    if not isinstance(value, dict):
        raise flight.FlightServerError(f"kdserve: bad {what}: not a JSON object")
    return value


class TeacherServer(flight.FlightServerBase):  # type: ignore[misc]
    """Serves one teacher's knowledge. Listens from construction until :meth:`close`."""

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
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        scheme = "grpc+tls" if tls else "grpc"
        try:
            super().__init__(
                f"{scheme}://{host}:{port}",
                tls_certificates=[tls] if tls else None,
                middleware={"auth": _TokenCheck(token, name)},
            )
        except (pa.ArrowException, OSError) as exc:
            raise KdserveError(
                f"teacher {name!r} cannot listen on {host}:{port} ({exc}); the port may be "
                f"taken: choose another out_port, or stop the process using it"
            ) from None
        self.name = name
        self.chunk_bytes = chunk_bytes
        self.schema = schema
        self.window = window
        self.query = query
        self._outbox: list[bytes] = []
        self._outbox_changed = threading.Condition()
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()

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

    def get_schema(self, context: Any, descriptor: Any) -> flight.SchemaResult:
        self._check_ready()
        if self.schema is None:
            raise flight.FlightServerError(
                f"kdserve: teacher {self.name!r} serves queries only; it has no knowledge stream"
            )
        return flight.SchemaResult(self.schema)

    def do_get(self, context: Any, ticket: flight.Ticket) -> flight.FlightDataStream:
        self._check_ready()
        if self.window is None or self.schema is None:
            raise flight.FlightServerError(f"kdserve: teacher {self.name!r} serves queries only")
        spec = _json(ticket.ticket, "ticket")
        try:
            pass_, seq = int(spec["pass"]), int(spec["seq"])
            rank, world = int(spec["rank"]), int(spec["world_size"])
            batches = self.window.stream(pass_, seq, rank, world)
            first = next(batches, None)  # validate now: errors reach the client as errors
        except (KeyError, TypeError, ValueError):
            raise flight.FlightServerError(
                "kdserve: bad ticket: needs pass, seq, rank, world_size"
            ) from None
        except ProtocolError as exc:
            raise flight.FlightServerError(f"kdserve: {exc}") from None
        except WindowStoppedError as exc:
            raise flight.FlightUnavailableError(f"kdserve: teacher {self.name!r}: {exc}") from None

        window = self.window

        def stream() -> Iterator[tuple[pa.RecordBatch, pa.Buffer]]:
            items = batches if first is None else _chain(first, batches)
            group: list[tuple[int, pa.RecordBatch]] = []  # small batches sent as one message
            try:
                for s, batch in items:
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
            except WindowStoppedError as exc:
                # Not a normal end: the student must not take it for the end of the pass.
                raise flight.FlightUnavailableError(
                    f"kdserve: teacher {self.name!r}: {exc}"
                ) from None

        return flight.GeneratorStream(self.schema, stream())

    # -- actions --------------------------------------------------------------------

    def list_actions(self, context: Any) -> list[tuple[str, str]]:
        return [
            ("ack", "a rank has its batches before a position"),
            ("info", "the teacher's name, passes and services"),
            ("schema", "the knowledge schema, Arrow IPC serialized"),
            ("send", "a student's message to the teacher"),
            ("recv", "the teacher's messages after an index"),
        ]

    def do_action(self, context: Any, action: flight.Action) -> Iterator[flight.Result]:
        kind, body = action.type, action.body.to_pybytes()
        if kind == "info":
            self._check_ready()
            info = {
                "name": self.name,
                "times": self.window.times if self.window else 0,
                "buf_size": self.window.buf_size if self.window else 0,
                "stream": self.window is not None,
                "query": self.query is not None,
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
            if self.window is None:
                return iter([])
            spec = _json(body, "ack")
            try:
                self.window.ack(
                    int(spec["rank"]),
                    int(spec["world_size"]),
                    (int(spec["pass"]), int(spec["seq"])),
                )
            except (KeyError, TypeError, ValueError, ProtocolError) as exc:
                raise flight.FlightServerError(f"kdserve: bad ack: {exc}") from None
            return iter([])
        if kind == "send":
            try:
                envelope = decode_message(body)
                self.inbox.put((str(envelope["student"]), envelope["message"]))
            except (ProtocolError, KeyError, TypeError) as exc:
                raise flight.FlightServerError(f"kdserve: bad message: {exc}") from None
            return iter([])
        if kind == "recv":
            spec = _json(body, "recv")
            after, wait = (
                int(spec.get("after", 0)),
                min(float(spec.get("wait", 0)), MAX_MESSAGE_WAIT),
            )
            deadline = time.monotonic() + wait
            with self._outbox_changed:
                while len(self._outbox) <= after and time.monotonic() < deadline:
                    self._outbox_changed.wait(deadline - time.monotonic())
                fresh = self._outbox[after:]
            return iter([flight.Result(m) for m in fresh])
        raise flight.FlightServerError(f"kdserve: unknown action {kind!r}")

    def broadcast(self, message: Any) -> None:
        """Queue a message every student can ``recv`` (numbered from 0 in sending order)."""
        data = encode_message(message)
        with self._outbox_changed:
            self._outbox.append(data)
            self._outbox_changed.notify_all()

    # -- query mode -----------------------------------------------------------------

    def do_exchange(
        self, context: Any, descriptor: flight.FlightDescriptor, reader: Any, writer: Any
    ) -> None:
        if self.query is None:
            raise flight.FlightServerError(
                f"kdserve: teacher {self.name!r} does not answer queries"
            )
        started = False
        for chunk in reader:
            if chunk.data is None:
                continue
            try:
                result = self.query(chunk.data)
            except KdserveError as exc:
                raise flight.FlightServerError(f"kdserve: query refused: {exc}") from None
            except Exception as exc:  # the program's own error: logged here, named there
                traceback.print_exc(file=sys.stderr)
                raise flight.FlightServerError(
                    f"kdserve: teacher {self.name!r}'s program failed on a query: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            if not started:
                writer.begin(result.schema)
                started = True
            writer.write_batch(result)


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
