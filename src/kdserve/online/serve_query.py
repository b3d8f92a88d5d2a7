"""The teacher's side of query mode: a student's input batches in, the knowledge for each
out, each input checked against the size limit first. The query function's refusal (a
kdserve error) reaches the student as the same error; its failure is logged here and
reaches the student named, without its traceback."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from kdserve.errors import KdserveError, ProtocolError
from kdserve.online.guard import refusal
from kdserve.online.wire import one_line

__all__ = ["DEFAULT_MAX_QUERY_BYTES", "QueryFn", "answer_queries"]

QueryFn = Callable[[pa.RecordBatch], pa.RecordBatch]
"""A batch of a student's inputs -> the knowledge for it."""
DEFAULT_MAX_QUERY_BYTES = 256 << 20
log = logging.getLogger(__name__)


def answer_queries(query: QueryFn, reader: Any, writer: Any, max_bytes: int, teacher: str) -> None:
    """Answer every batch ``reader`` (a Flight exchange's) brings, on ``writer``."""
    started = False
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            return
        except pa.ArrowInvalid as exc:  # not Arrow IPC, or a batch off its schema
            raise ProtocolError(f"bad query batch: {one_line(str(exc), 200)}") from None
        if chunk.data is None:
            continue
        if chunk.data.nbytes > max_bytes:
            raise ProtocolError(
                f"query refused: a batch of {chunk.data.nbytes} bytes, over the limit of "
                f"{max_bytes}; send smaller batches"
            )
        result = _answer(query, chunk.data, teacher)
        if not started:
            writer.begin(result.schema)
            started = True
        writer.write_batch(result)


def _answer(query: QueryFn, inputs: pa.RecordBatch, teacher: str) -> pa.RecordBatch:
    """The query function's answer; its failure goes to the student, named."""
    try:
        return query(inputs)
    except KdserveError as exc:  # refused: the student gets the same error
        raise refusal(exc, f"query refused: {one_line(str(exc))}") from None
    except Exception as exc:  # the program's own error: logged here, named there
        log.error("teacher %s: the program failed on a query", teacher, exc_info=exc)
        raise KdserveError(
            f"teacher {teacher!r}'s program failed on a query: "
            f"{type(exc).__name__}: {one_line(str(exc), 200)}"
        ) from None
