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

if TYPE_CHECKING:
    from kdserve.online.client import TeacherClient

__all__ = ["query"]

_JOIN = 30.0  # seconds the sending thread gets to finish once the exchange is over


def query(
    client: TeacherClient, batches: Iterable[pa.RecordBatch], max_in_flight: int
) -> Iterator[pa.RecordBatch]:
    """Send input batches, get the knowledge for each, ``max_in_flight`` pipelined."""
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
        try:
            writer.close()  # raises the call's error again, if it failed
        except flight.FlightError as exc:
            if error is None:  # never mask the error already on its way
                raise client.error(exc) from None


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
            begun = False
            for batch in self.batches:
                while not self.slots.acquire(timeout=POLL):
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
