"""The student's side of query mode: input batches go to the teacher on a thread of their
own while the knowledge for each comes back, at most ``max_in_flight`` ahead."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pyarrow import flight

from kdserve.core.wait import POLL
from kdserve.errors import KdserveError, SchemaError
from kdserve.online.patience import patience

if TYPE_CHECKING:
    from kdserve.online.client import TeacherClient

__all__ = ["query"]

_JOIN = 30.0  # seconds the sending thread gets to finish once the exchange is over


def query(
    client: TeacherClient, batches: Iterable[pa.RecordBatch], max_in_flight: int
) -> Iterator[pa.RecordBatch]:
    """Send input batches, get the knowledge for each, ``max_in_flight`` pipelined. A
    teacher that answers nothing for the client's ``stall_timeout`` is given up on
    (TeacherUnavailableError; warned about each minute before); ``client.close()`` ends
    a read waiting for an answer."""
    writer, reader = client.exchange()
    waited = patience(client.name, "a query", client.stall_timeout)
    state = _QueryWrite(writer, reader, batches, max_in_flight, waited, lambda: client.closed)
    thread = threading.Thread(target=state.run, name="kdserve-query", daemon=True)
    thread.start()
    received = 0
    error: BaseException | None = None
    try:
        while not (state.finished.is_set() and received >= state.sent) or state.failure:
            if state.failure:
                raise _failed(client, state.failure[0])
            state.waiting = time.monotonic()
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                break
            except flight.FlightError as exc:
                raise _why(client, state, exc) from None
            finally:
                state.waiting = None
            received += 1
            state.slots.release()
            yield chunk.data
        state.over.set()
        thread.join(timeout=_JOIN)
        if state.failure:  # the inputs failed after the last result came back
            raise _failed(client, state.failure[0])
    except BaseException as exc:
        error = exc
        raise
    finally:
        state.over.set()
        thread.join(timeout=_JOIN)
        client.release(reader)
        try:
            writer.close()  # raises the call's error again, if it failed
        except flight.FlightError as exc:
            if error is None:  # never mask the error already on its way
                raise client.error(exc) from None


def _why(client: TeacherClient, state: _QueryWrite, exc: flight.FlightError) -> BaseException:
    """What to raise for a failed read: the stall, the student closing, or the error."""
    if state.stalled is not None:
        return state.stalled
    if client.closed:
        return KdserveError(
            f"the query to teacher {client.name!r} was cancelled: the student was closed"
        )
    return client.error(exc)


def _unlike(first: pa.Schema, schema: pa.Schema, index: int) -> SchemaError:
    """The error for batch ``index`` of a query stream whose inputs differ from the first's."""
    names = list(dict.fromkeys([*first.names, *schema.names]))
    name = next(
        (
            n
            for n in names
            if n not in first.names or n not in schema.names or first.field(n) != schema.field(n)
        ),
        names[0],  # the same inputs in another order
    )

    def of(s: pa.Schema) -> str:
        return str(s.field(name).type) if name in s.names else "missing"

    return SchemaError(
        f"query batch {index} gives input {name!r} as {of(schema)}, the first batch of this "
        f"query stream as {of(first)}: a stream's batches share their inputs' dtypes and "
        f"shapes. Give sequences as lists of arrays (any lengths), pad to one length, or "
        f"query each batch on its own",
        field=name,
    )


def _failed(client: TeacherClient, exc: BaseException) -> BaseException:
    """What to raise for the sending side's failure: a Flight error as kdserve's."""
    return client.error(exc) if isinstance(exc, flight.FlightError) else exc


class _QueryWrite:
    """The sending side of a query exchange, run on its own thread, which also watches
    the reading side's waits: ``waited(seconds)`` may raise (the teacher stalls), and
    then the read is cancelled and that error raised there."""

    def __init__(
        self,
        writer: Any,
        reader: Any,
        batches: Iterable[pa.RecordBatch],
        max_in_flight: int,
        waited: Callable[[float], None],
        closed: Callable[[], bool],
    ) -> None:
        self.writer = writer
        self.reader = reader
        self.batches = batches
        self.waited = waited
        self.closed = closed  # the client closed: an abandoned stream's thread ends too
        self.slots = threading.Semaphore(max_in_flight)
        self.sent = 0
        self.failure: list[BaseException] = []
        self.finished = threading.Event()  # every input sent (or the sending failed)
        self.over = threading.Event()  # the reading side is done
        self.waiting: float | None = None  # since when the reading side waits for an answer
        self.stalled: BaseException | None = None

    def run(self) -> None:
        self._send()
        while not self.over.wait(POLL) and not self.closed() and self._watch():
            pass

    def _watch(self) -> bool:
        """False once the reading side waited too long (its read is cancelled)."""
        since = self.waiting
        if since is not None and self.stalled is None:
            try:
                self.waited(time.monotonic() - since)
            except BaseException as exc:  # raised by the reading side
                self.stalled = exc
                self.reader.cancel()
        return self.stalled is None

    def _send(self) -> None:
        done = False  # done_writing() called: gRPC aborts the process on a second call
        try:
            first: pa.Schema | None = None
            for batch in self.batches:
                while not self.slots.acquire(timeout=POLL):
                    if self.over.is_set() or self.closed() or not self._watch():
                        return
                if first is None:
                    first = batch.schema
                    self.writer.begin(first)
                elif not batch.schema.equals(first):
                    raise _unlike(first, batch.schema, self.sent)
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
