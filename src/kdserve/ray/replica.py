"""One replica of a teacher pool: the user's program in a Ray actor, answering queries
over Arrow Flight and dumping its part of a dataset. A replica Ray restarts after a
crash serves on a new port and registers it again, so students find it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from kdserve.core.batch import to_record_batch
from kdserve.core.schema import SAMPLE_ID, Schema
from kdserve.teacher.dump import dump
from kdserve.teacher.encoder import Encoder, Keep, infer_schema
from kdserve.teacher.serve import Service, serve

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
        copy), and its rows (two objects: ranks even their shares by the rows alone)."""
        rows = 0
        start = time.perf_counter()
        sink = pa.BufferOutputStream()
        writer: pa.ipc.RecordBatchStreamWriter | None = None
        for inputs in data_factory(epoch, part, parts):
            feed = dict(inputs)
            ids = np.asarray(feed.pop(SAMPLE_ID))
            knowledge = self.encoder.infer(feed)
            if self.schema is None:
                self._publish(infer_schema(knowledge, False))
            assert self.schema is not None
            batch = to_record_batch(knowledge, self.schema, ids)
            if writer is None:
                writer = pa.ipc.new_stream(sink, batch.schema)
            writer.write_batch(batch)
            rows += len(ids)
        if writer is not None:
            writer.close()
        self.samples += rows
        self.busy += time.perf_counter() - start
        return np.frombuffer(sink.getvalue(), dtype=np.uint8), rows

    def stats(self) -> dict[str, Any]:
        """This replica's figures: address, samples dumped and their rate."""
        rate = self.samples / self.busy if self.busy else 0.0
        return {"address": self.service.address, "samples": self.samples, "samples_per_s": rate}
