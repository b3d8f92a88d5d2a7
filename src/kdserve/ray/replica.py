"""One replica of a teacher pool: the user's program in a Ray actor, answering queries
over Arrow Flight and dumping its part of a dataset. A replica Ray restarts after a
crash serves on a new port and registers it again, so students find it."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from kdserve.core.schema import SAMPLE_ID, Schema
from kdserve.teacher.dump import dump
from kdserve.teacher.encoder import Encoder, Keep
from kdserve.teacher.pipeline import Pipeline
from kdserve.teacher.serve import Service, serve
from kdserve.teacher.sinks import Rows, Sink

__all__ = ["Replica"]


class Replica:
    """A pool's teacher: ``program_factory()`` built once per (re)start, served for
    queries on ``host``, registered with the pool's ``registry`` actor as ``name``."""

    def __init__(
        self,
        name: str,
        registry: Any,
        program_factory: Callable[[], Any],
        feeds: Sequence[str],
        keep: Keep | None,
        host: str,
        token: str,
        provenance: Mapping[str, Any],
    ) -> None:
        self.name = name
        self.feeds = [f for f in feeds if f != SAMPLE_ID]
        self.program = program_factory()
        self.keep = keep
        self.schema: Schema | None = keep if isinstance(keep, Schema) else None
        self.encoder = Encoder(self.program, keep, False, feeds, self._schema, self._publish)
        self.samples = 0  # dumped by this process
        self.busy = 0.0  # seconds spent dumping
        self.service: Service = serve(
            self.program, None, feeds=list(feeds), keep=keep, host=host, token=token,
            progress=False, name=name, provenance=provenance,
        )  # fmt: skip
        ray.get(registry.register.remote(name, self.service.address))

    def _schema(self) -> Schema | None:
        return self.schema

    def _publish(self, schema: Schema) -> None:
        self.schema = schema

    def address(self) -> str:
        """Where this replica answers queries."""
        return self.service.address

    def dump(
        self,
        data_factory: Callable[[int, int], Iterable[Mapping[str, Any]]],
        part: int,
        parts: int,
        path: str,
        options: Mapping[str, Any],
    ) -> int:
        """Dump part ``part`` of ``parts`` of the data into the store at ``path`` (resumed
        if it exists); returns the samples it holds."""
        start = time.perf_counter()
        written = dump(self.program, data_factory(part, parts), path, keep=self.keep, **options)
        self.samples += written
        self.busy += time.perf_counter() - start
        return written

    @ray.method(num_returns=2)
    def compute(
        self,
        data_factory: Callable[[int, int, int], Iterable[Mapping[str, Any]]],
        epoch: int,
        part: int,
        parts: int,
    ) -> tuple[np.ndarray, int]:
        """The knowledge of part ``part`` of ``parts`` of pass ``epoch``, as one Arrow IPC
        stream in a uint8 array (which Ray's object store hands to a student without a
        copy), and its rows (two objects: ranks even their shares by the rows alone).
        It runs through a teacher's pipeline: the program's next batch is queued while
        the host encodes the last one."""
        start = time.perf_counter()
        batches = iter(data_factory(epoch, part, parts))
        first = next(batches, None)
        stream = _Stream()
        if first is not None:  # (an empty part is an empty stream)
            Pipeline(
                itertools.chain([first], batches),
                [*self.feeds, SAMPLE_ID],
                self.encoder,
                [stream],
                stop=threading.Event(),
                label=f"replica {self.name}",
                progress=False,
            ).run()
        self.samples += stream.rows
        self.busy += time.perf_counter() - start
        return stream.value(), stream.rows

    def stats(self) -> dict[str, Any]:
        """This replica's figures: address, samples dumped and their rate."""
        rate = self.samples / self.busy if self.busy else 0.0
        return {"address": self.service.address, "samples": self.samples, "samples_per_s": rate}


class _Stream(Sink):
    """A part's knowledge batches, written in order into one Arrow IPC stream in memory."""

    def __init__(self) -> None:
        self.buffer = pa.BufferOutputStream()
        self.writer: pa.ipc.RecordBatchStreamWriter | None = None
        self.rows = 0

    def wants(self, pass_: int, seq: int, ids: np.ndarray) -> Rows | None:
        return True

    def put(self, pass_: int, seq: int, batch: pa.RecordBatch, rows: Rows) -> int:
        if self.writer is None:
            self.writer = pa.ipc.new_stream(self.buffer, batch.schema)
        self.writer.write_batch(batch)
        self.rows += batch.num_rows
        return int(batch.num_rows)

    def value(self) -> np.ndarray:
        """The stream's bytes (empty if no batch came)."""
        if self.writer is not None:
            self.writer.close()
        return np.frombuffer(self.buffer.getvalue(), dtype=np.uint8)
