"""Messaging: a student's messages to and from served teachers, and query mode (inputs
sent, knowledge returned), over a teacher's connection."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from kdserve.core.batch import Knowledge, from_record_batch, to_record_batch
from kdserve.core.schema import SAMPLE_ID, Schema
from kdserve.core.wait import slices
from kdserve.errors import SchemaError
from kdserve.online.client import TeacherClient

__all__ = ["query_batches", "recv_message"]

_LONG_POLL = 1.0  # seconds a teacher holds one recv request open


def recv_message(client: TeacherClient, after: int, timeout: float | None) -> Any:
    """The teacher's message number ``after`` (0-based); waits up to ``timeout`` seconds
    (None: until one comes). Raises TimeoutError when none came."""
    for step in slices(timeout, _LONG_POLL):
        messages = client.recv(after, step)
        if messages:
            return messages[0]
    raise TimeoutError(f"no message from teacher {client.name!r} within {timeout} s")


def query_batches(
    client: TeacherClient,
    batches: Iterable[Mapping[str, Any]],
    max_in_flight: int,
    knowledge: Callable[[pa.RecordBatch], Knowledge] = from_record_batch,
) -> Iterator[Knowledge]:
    """Knowledge for each batch of inputs, in input order, ``max_in_flight`` requests
    pipelined. Sample ids are a ``sample_id`` input or 0..n-1 per batch; ``knowledge``
    reads each answer (e.g. with ``decode=False``, or through a teacher's vocab_map)."""

    def arrow() -> Iterator[pa.RecordBatch]:
        for inputs in batches:
            if not isinstance(inputs, Mapping):
                raise TypeError(
                    f"a query batch is a dict of input arrays {{feed: array}}, got "
                    f"{type(inputs).__name__}"
                )
            data = dict(inputs)
            ids = data.pop(SAMPLE_ID, None)
            if not data:
                raise SchemaError(
                    f"a query batch needs at least one input array besides {SAMPLE_ID!r}, "
                    f"got {sorted(inputs)}"
                )
            n = len(next(iter(data.values())))
            schema = Schema.from_arrays(data)
            yield to_record_batch(data, schema, np.arange(n) if ids is None else ids)

    for result in client.query(arrow(), max_in_flight):
        yield knowledge(result)
