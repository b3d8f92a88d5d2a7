"""A student's connection to one online teacher (an Arrow Flight client).

The token is ``token=``, else ``KDSERVE_TOKEN``, else (for a loopback address only) the
token that a teacher of this user on this host published (:mod:`kdserve.online.tokens`).

Calls retry with exponential backoff while the teacher cannot be reached, for up to
``connect_timeout`` seconds, then raise :class:`~kdserve.errors.TeacherUnavailableError`;
so teacher and student may start in either order, and a teacher that restarts is
waited for. A knowledge stream that breaks is asked for again from the first batch
not fully received: with the teacher's replay window, no sample is lost or repeated.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import pyarrow as pa
from pyarrow import flight

from kdserve.core.schema import Schema
from kdserve.errors import (
    AuthenticationError,
    KdserveError,
    ProtocolError,
    TeacherUnavailableError,
)
from kdserve.online.messages import (
    MAX_MESSAGE_BYTES,
    MAX_MESSAGE_DEPTH,
    decode_message,
    encode_envelope,
    load_json,
)
from kdserve.online.tokens import find_token, is_loopback, split_address, token_path

__all__ = ["TeacherClient", "parse_address"]


class _NoTokenYetError(Exception):
    """No explicit token, and no same-host teacher has published one for the address."""


T = TypeVar("T")
_TRANSIENT = (
    flight.FlightUnavailableError,
    flight.FlightTimedOutError,
    flight.FlightInternalError,
    flight.FlightCancelledError,
)
TOKEN_ENV = "KDSERVE_TOKEN"
_NO_MESSAGE = (1 << 53) - 1  # a message index past any teacher's messages
_MAX_META_BYTES = 64 << 10  # a stream chunk's metadata: a few numbers (and row counts)
_GRPC_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def parse_address(address: str, tls: bool) -> str:
    """``host:port`` (or a grpc:// / grpc+tls:// URI) -> a Flight location URI."""
    if "://" in address:
        return address
    if split_address(address) is None:
        raise KdserveError(f"teacher address {address!r} is not host:port (e.g. 127.0.0.1:8470)")
    return f"{'grpc+tls' if tls else 'grpc'}://{address}"


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
    ) -> None:
        self.name = name
        self.address = address
        self.connect_timeout = connect_timeout
        self.max_message_bytes = MAX_MESSAGE_BYTES  # until info() tells the teacher's
        self._dropped: list[int] = []  # indices of the teacher's messages found undecodable
        location = parse_address(address, tls_root_certs is not None)
        self._given = token or os.environ.get(TOKEN_ENV)  # an explicit token always wins
        self._found: str | None = None  # else the token a same-host teacher published
        host_port = split_address(address)
        if not self._given and not (host_port and is_loopback(host_port[0])):
            raise AuthenticationError(_no_token(name, address), teacher=name)
        kwargs: dict[str, Any] = {"tls_root_certs": tls_root_certs} if tls_root_certs else {}
        if tls_client_cert is not None:  # mutual TLS: (cert chain, key) PEM
            kwargs |= {"cert_chain": tls_client_cert[0], "private_key": tls_client_cert[1]}
        # gRPC's own reconnect backoff grows to 120 s: a teacher back after a long outage
        # would go unnoticed for longer than connect_timeout. Cap it like call()'s backoff.
        self._client = flight.FlightClient(location, generic_options=_GRPC_OPTIONS, **kwargs)

    def close(self) -> None:
        self._client.close()

    def _options(self, timeout: float | None = None) -> flight.FlightCallOptions:
        headers = [(b"authorization", f"Bearer {self._token()}".encode())]
        return flight.FlightCallOptions(headers=headers, timeout=timeout)

    def _token(self) -> str:
        """The token to send; _NoTokenYetError while a same-host teacher has published none
        (it may not have started yet: call() waits for it like for an unreachable one)."""
        if self._given:
            return self._given
        if self._found is None:
            self._found = find_token(self.address)
        if self._found is None:
            raise _NoTokenYetError
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

    def ping(self) -> None:
        """Check that the teacher answers and takes the token (its service may not run
        yet); waits up to ``connect_timeout`` for it, like every call."""
        self.action("recv", json.dumps({"after": _NO_MESSAGE, "wait": 0}).encode())

    def _fail(self, exc: Exception) -> Exception:
        """The kdserve error for a Flight error that retrying will not cure."""
        if isinstance(exc, flight.FlightUnauthenticatedError):
            return AuthenticationError(
                f"teacher {self.name!r} at {self.address} refused the token; use the token "
                f"the teacher was started with (token= or {TOKEN_ENV})",
                teacher=self.name,
            )
        text = " ".join(str(exc).split(". Detail:")[0].split())
        if "kdserve internal:" in text:
            detail = text.split("kdserve internal:", 1)[1].strip()
            return KdserveError(f"teacher {self.name!r}: {detail}", teacher=self.name)
        if "kdserve:" in text:
            return ProtocolError(f"teacher {self.name!r}: {text.split('kdserve:', 1)[1].strip()}")
        return ProtocolError(f"teacher {self.name!r} at {self.address} failed: {text}")

    def call(self, fn: Callable[[], T], what: str, deadline: float | None = None) -> T:
        """Run ``fn`` with retries and backoff until it works or the deadline passes."""
        deadline = deadline or time.monotonic() + self.connect_timeout
        delay = 0.05
        while True:
            try:
                return fn()
            except (*_TRANSIENT, _NoTokenYetError) as exc:
                if isinstance(exc, _NoTokenYetError) and time.monotonic() + delay > deadline:
                    raise AuthenticationError(
                        _no_token(self.name, self.address), teacher=self.name
                    ) from None
                if time.monotonic() + delay > deadline:
                    raise TeacherUnavailableError(
                        f"teacher {self.name!r} at {self.address} did not answer ({what}) for "
                        f"{self.connect_timeout:g} s: is it running, on that port, with TLS on "
                        f"both sides (tls_root_certs=) or on neither? "
                        f"({str(exc).split('. Detail:')[0]})",
                        teacher=self.name,
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
            except flight.FlightUnauthenticatedError as exc:
                if not self._token_changed():
                    raise self._fail(exc) from None
            except flight.FlightError as exc:
                raise self._fail(exc) from None

    # -- calls ----------------------------------------------------------------------

    def action(self, kind: str, body: bytes = b"") -> list[bytes]:
        def run() -> list[bytes]:
            results = self._client.do_action(flight.Action(kind, body), self._options())
            return [r.body.to_pybytes() for r in results]

        return self.call(run, kind)

    def info(self) -> dict[str, Any]:
        """The teacher's name, passes, services and message size limit."""
        (data,) = self.action("info")
        info = load_json(
            data, f"teacher {self.name!r}'s info", max_bytes=_MAX_META_BYTES, max_depth=4
        )
        if not isinstance(info, dict):
            raise ProtocolError(f"teacher {self.name!r} sent info that is not a JSON object")
        limit = info.get("max_message_bytes", MAX_MESSAGE_BYTES)
        if type(limit) is int and limit > 0:
            self.max_message_bytes = limit
        return info

    def schema(self) -> Schema:
        (data,) = self.action("schema")
        return Schema.from_arrow(pa.ipc.read_schema(pa.py_buffer(data)))

    def send(self, student: str, message: Any) -> None:
        """Send ``message`` from ``student``; TypeError/ValueError (nothing sent) for a
        message that cannot be sent, ProtocolError when the teacher refuses it."""
        body = encode_envelope(student, message, max_bytes=self.max_message_bytes)
        self.action("send", body)

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
        body = json.dumps({"after": start, "wait": wait}).encode()
        messages: list[Any] = []
        for offset, data in enumerate(self.action("recv", body)):
            try:
                messages.append(
                    decode_message(
                        data, max_bytes=self.max_message_bytes, max_depth=MAX_MESSAGE_DEPTH
                    )
                )
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

    def _ack(self, pass_: int, seq: int, rank: int, world_size: int) -> None:
        spec = {"pass": pass_, "seq": seq, "rank": rank, "world_size": world_size}
        self.action("ack", json.dumps(spec).encode())

    def stream_pass(
        self,
        pass_: int,
        rank: int,
        world_size: int,
        ack_every: int,
        shares: list[int] | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """This rank's batches of pass ``pass_``, resumed across broken connections. At
        the end of the pass, ``shares`` (if given) is set to every rank's rows."""
        seq = rank  # the next batch this rank needs
        since_ack = 0
        while True:
            ticket = {"pass": pass_, "seq": seq, "rank": rank, "world_size": world_size}
            parts: list[pa.RecordBatch] = []
            try:
                reader = self.call(
                    lambda t=ticket: self._client.do_get(  # type: ignore[misc]
                        flight.Ticket(json.dumps(t).encode()), self._options()
                    ),
                    "knowledge",
                )
                for chunk in reader:
                    meta = self._chunk_meta(chunk.app_metadata)
                    if (meta["pass"], meta["seq"], meta["part"]) != (pass_, seq, len(parts)):
                        raise ProtocolError(
                            f"teacher {self.name!r} sent batch {meta} while pass {pass_}, "
                            f"batch {seq}, part {len(parts)} was expected"
                        )
                    if "shares" in meta:  # the end of this rank's pass
                        if shares is not None:
                            shares[:] = meta["shares"]
                        continue
                    parts.append(chunk.data)
                    if len(parts) < meta["parts"]:
                        continue
                    # A batch goes on only once all its parts are here; a message of several
                    # small batches ("rows") is cut back into them, without copying.
                    batches = [parts]  # the parts of one batch
                    if "rows" in meta:
                        rows = meta["rows"]
                        if sum(rows) != chunk.data.num_rows:
                            raise ProtocolError(
                                f"teacher {self.name!r} sent {chunk.data.num_rows} rows as "
                                f"batches of {rows[:10]} rows"
                            )
                        starts = list(itertools.accumulate(rows, initial=0))[:-1]
                        batches = [
                            [chunk.data.slice(o, r)] for o, r in zip(starts, rows, strict=True)
                        ]
                    for pieces in batches:
                        yield from pieces
                        seq += world_size
                        since_ack += 1
                        if since_ack >= ack_every:
                            self._ack(pass_, seq, rank, world_size)
                            since_ack = 0
                    parts = []
            except _TRANSIENT:
                continue  # reconnect: call() waits for the teacher, up to connect_timeout
            except flight.FlightError as exc:
                raise self._fail(exc) from None
            self._ack(pass_ + 1, rank, rank, world_size)  # the pass is over for this rank
            return

    def _chunk_meta(self, data: pa.Buffer | None) -> dict[str, Any]:
        """A stream chunk's metadata, checked: ProtocolError for anything malformed."""
        raw = data.to_pybytes() if data is not None else b""
        what = f"teacher {self.name!r}'s batch metadata"
        meta = load_json(raw, what, max_bytes=_MAX_META_BYTES, max_depth=2)
        keys = {"pass", "seq", "part", "parts"}
        if (
            not isinstance(meta, dict)
            or not keys <= set(meta) <= keys | {"rows", "shares"}
            or not all(type(meta[k]) is int and meta[k] >= 0 for k in keys)
            or meta["parts"] < 1
            or any(
                k in meta
                and not (
                    isinstance(meta[k], list) and all(type(r) is int and r >= 0 for r in meta[k])
                )
                for k in ("rows", "shares")
            )
        ):
            raise ProtocolError(f"{what} is malformed: {raw[:100]!r}")
        return meta

    def query(
        self, batches: Iterable[pa.RecordBatch], max_in_flight: int
    ) -> Iterator[pa.RecordBatch]:
        """Send input batches, get the knowledge for each, ``max_in_flight`` pipelined."""
        descriptor = flight.FlightDescriptor.for_command(b"query")
        writer, reader = self.call(
            lambda: self._client.do_exchange(descriptor, self._options()), "query"
        )
        state = _QueryWrite(writer, batches, max_in_flight)
        thread = threading.Thread(target=state.run, name="kdserve-query", daemon=True)
        thread.start()
        received = 0
        error: BaseException | None = None
        try:
            while not (state.finished.is_set() and received >= state.sent) or state.failure:
                if state.failure:
                    raise self._failed(state.failure[0])
                try:
                    chunk = reader.read_chunk()
                except StopIteration:
                    break
                except flight.FlightError as exc:
                    raise self._fail(exc) from None
                received += 1
                state.slots.release()
                yield chunk.data
            thread.join(timeout=30)
            if state.failure:  # the inputs failed after the last result came back
                raise self._failed(state.failure[0])
        except BaseException as exc:
            error = exc
            raise
        finally:
            state.finished.set()
            thread.join(timeout=30)
            try:
                writer.close()  # raises the call's error again, if it failed
            except flight.FlightError as exc:
                if error is None:  # never mask the error already on its way
                    raise self._fail(exc) from None

    def _failed(self, exc: BaseException) -> BaseException:
        return self._fail(exc) if isinstance(exc, flight.FlightError) else exc


def _no_token(name: str, address: str) -> str:
    """Why a client has no token for ``address``, and where one comes from."""
    text = (
        f"no token for teacher {name!r} at {address}: pass token= or set {TOKEN_ENV} (the "
        f"teacher prints its token when it starts)"
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


class _QueryWrite:
    """The sending side of a query exchange, run on its own thread."""

    def __init__(self, writer: Any, batches: Iterable[pa.RecordBatch], max_in_flight: int) -> None:
        self.writer = writer
        self.batches = batches
        self.slots = threading.Semaphore(max_in_flight)
        self.sent = 0
        self.failure: list[BaseException] = []
        self.finished = threading.Event()

    def run(self) -> None:
        done = False  # done_writing() called: gRPC aborts the process on a second call
        try:
            begun = False
            for batch in self.batches:
                while not self.slots.acquire(timeout=0.1):
                    if self.finished.is_set():
                        return
                if not begun:
                    self.writer.begin(batch.schema)
                    begun = True
                self.writer.write_batch(batch)
                self.sent += 1
            done = True
            self.writer.done_writing()
        except BaseException as exc:  # handed to the reading side
            self.failure.append(exc)
            # End the exchange, so a read waiting for results that will not come returns.
            if not done:
                with contextlib.suppress(pa.ArrowException, OSError):
                    self.writer.done_writing()
        finally:
            self.finished.set()
