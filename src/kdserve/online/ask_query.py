"""The student's side of query mode: input batches go to the teacher on a thread of their
own while the knowledge for each comes back, at most ``max_in_flight`` ahead."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pyarrow import flight

from kdserve.core.wait import POLL
from kdserve.errors import SchemaError

if TYPE_CHECKING:
    from kdserve.online.client import TeacherClient

__all__ = ["query"]

_JOIN = 30.0  # seconds the sending thread gets to finish once the exchange is over


def query(
    client: TeacherClient, batches: Iterable[pa.RecordBatch], max_in_flight: int
) -> Iterator[pa.RecordBatch]:
    """Send input batches, get the knowledge for each, ``max_in_flight`` pipelined. A
    read is cancelled by ``client.cancel_streams()`` (the student closing, or giving up
    on the teacher)."""
    since = client.cancels
    writer, reader = client.exchange()
    state = _QueryWrite(writer, batches, max_in_flight)
    thread = threading.Thread(target=state.run, name="kdserve-query", daemon=True)
    thread.start()
    received = 0
    error: BaseException | None = None
    try:
        while not (state.finished.is_set() and received >= state.sent) or state.failure:
            if state.failure:
                raise _failed(client, state.failure[0])
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                break
            except flight.FlightError as exc:
                client.check_cancelled(since)
                raise client.error(exc) from None
            received += 1
            state.slots.release()
            yield chunk.data
        thread.join(timeout=_JOIN)
        if state.failure:  # the inputs failed after the last result came back
            raise _failed(client, state.failure[0])
    except BaseException as exc:
        error = exc
        raise
    finally:
        state.finished.set()
        thread.join(timeout=_JOIN)
        client.release(reader)
        try:
            writer.close()  # raises the call's error again, if it failed
        except flight.FlightError as exc:
            if error is None:  # never mask the error already on its way
                raise client.error(exc) from None


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
            first: pa.Schema | None = None
            for batch in self.batches:
                while not self.slots.acquire(timeout=POLL):
                    if self.finished.is_set():
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
