"""Sinks: where a teacher's knowledge batches go -- its store, or the replay window that
serves them to students. A sink says which rows of a batch it still needs before the
batch is computed, then takes the batch; a new destination is one more Sink class."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kdserve.core.codecs import Fp16
from kdserve.core.schema import Schema
from kdserve.core.wait import POLL
from kdserve.errors import StoreError
from kdserve.online.replay import ReplayWindow
from kdserve.store import Compression, StoreWriter, stored_rows
from kdserve.store.manifest import parse_manifest, read_manifest
from kdserve.store.writer import ipc_options

__all__ = ["ServeSink", "Sink", "StoreSink"]

_log = logging.getLogger(__name__)

Rows = np.ndarray | bool  # which rows of a batch a sink takes: a mask, or True for all


class Sink(ABC):
    """One destination of a knowledge service's batches, numbered ``(pass, seq)``."""

    def pass_needed(self, pass_: int) -> bool:
        """Whether pass ``pass_`` must be produced at all for this sink."""
        return pass_ == 0

    @abstractmethod
    def wants(self, pass_: int, seq: int, ids: np.ndarray) -> Rows | None:
        """The rows of batch ``(pass_, seq)`` (sample ``ids``) this sink needs; None: none."""

    @abstractmethod
    def put(self, pass_: int, seq: int, batch: pa.RecordBatch, rows: Rows) -> int:
        """Take the ``rows`` of a computed batch; return the samples delivered."""

    def end_pass(self, pass_: int, batches: int) -> None:  # noqa: B027 -- optional hook
        """Pass ``pass_`` is over after ``batches`` batches."""

    def drain(self, stop: threading.Event) -> None:  # noqa: B027 -- optional hook
        """Wait until everything put has been delivered (or ``stop`` is set)."""

    def fail(self, why: str) -> None:  # noqa: B027 -- optional hook
        """The service failed: tell whoever waits on this sink."""


class StoreSink(Sink):
    """Writes a teacher's knowledge into its store. One writer, opened on first use and
    again (resuming) for a dump that continues after the store was completed; a store
    that already holds rows is resumed by sample id, so re-runs fill any gap."""

    def __init__(
        self,
        path: str,
        teacher: dict[str, Any],
        shard_bytes: int,
        overwrite: bool,
        compression: Compression = None,
    ) -> None:
        self.path = path
        ipc_options(compression)  # refuse a bad one now, not when the first rows come
        self.compression = compression
        self.teacher = teacher  # recorded in the manifest: name, model
        self.shard_bytes = shard_bytes
        self.failed: str | None = None  # why the store must stay incomplete
        self.resume_rows = 0 if overwrite else stored_rows(path)
        self._overwrite = overwrite  # until the store is first opened
        self._announced = False  # the resume was reported
        self._schema: Schema | None = None
        self._writer: StoreWriter | None = None
        self._lock = threading.RLock()  # one thread writes, completes or closes

    def open(self, schema: Schema) -> None:
        """Fix the schema. The writer opens with the first rows (on the thread that writes,
        not the one that feeds the device); a resumed store's schema was checked already
        (:meth:`stored_schema`)."""
        self._schema = schema

    def _open(self) -> StoreWriter:
        assert self._schema is not None
        with self._lock:
            if self._writer is None:
                self._writer = StoreWriter(
                    self.path,
                    self._schema,
                    shard_bytes=self.shard_bytes,
                    overwrite=self._overwrite,
                    teacher=self.teacher,
                    compression=self.compression,
                )
                if self.resume_rows and not self._announced:
                    _log.info(
                        "resuming store %s: the %d samples it holds are skipped",
                        self.path,
                        self.resume_rows,
                    )
                self._announced = True
                self._overwrite = False
            return self._writer

    def stored_schema(self, names: list[str] | None, use_fp16: bool) -> Schema:
        """The schema of the store being resumed, if it is what ``names`` (None: any) and
        ``use_fp16`` ask for."""
        # from the manifest alone: the writer sets a damaged last shard aside, and the
        # reader's size checks would refuse the store for it
        stored, _ = parse_manifest(Path(self.path), read_manifest(Path(self.path)))
        floats = [f for f in stored if f.dtype.kind == "f" and f.dtype.itemsize > 2]
        fp16 = [f.codec == Fp16() for f in floats]
        if names not in (None, stored.names) or any(c != use_fp16 for c in fp16):
            raise StoreError(
                f"the store at {self.path} holds {stored.describe()}, but this dump keeps "
                f"{names} with use_fp16={use_fp16}; dump to another directory or pass "
                f"overwrite=True",
                path=self.path,
            )
        return stored

    @property
    def rows(self) -> int:
        """Rows in the store so far (including those found when resuming)."""
        with self._lock:
            if self._writer is not None:
                return self._writer.rows
        return stored_rows(self.path)

    def wants(self, pass_: int, seq: int, ids: np.ndarray) -> Rows | None:
        if pass_ != 0:
            return None
        if not self.resume_rows:  # a new store holds only new ids: no lock, no lookup
            return True
        with self._lock:
            missing = ~self._open().holds(ids)
        return missing if missing.any() else None

    def put(self, pass_: int, seq: int, batch: pa.RecordBatch, rows: Rows) -> int:
        if rows is not True:
            batch = batch.filter(pa.array(rows))
        with self._lock:
            self._open().write(batch)
        return int(batch.num_rows)

    def begin(self, service: bool) -> None:
        """A service (or a :meth:`Teacher.dump`) starts: after a failed one, it covers the
        same samples again, so the rows the failure left are looked up, not written
        twice; a service (a retry) may complete the store again."""
        with self._lock:
            if self.failed is not None:
                if not self._overwrite:  # else nothing was written: the store starts over
                    self.resume_rows = max(self.resume_rows, self.rows)
                if service:
                    self.failed = None

    def fail(self, why: str) -> None:
        self.keep_incomplete(f"its dump failed ({why})")

    def keep_incomplete(self, reason: str) -> None:
        """Never mark the store complete: ``reason`` (the first one given) says why."""
        self.failed = self.failed or reason

    def finish(self) -> None:
        """Make every written row durable and close the writer; mark the store complete
        unless a dump failed or was interrupted (then a re-run resumes it)."""
        with self._lock:
            if self._writer is None:
                return
            writer, self._writer = self._writer, None
            if self.failed is None:
                writer.close()
                return
            writer.close(complete=False)
            _log.warning(
                "store %s left incomplete (%d samples durable) because %s; re-run the dump "
                "to complete it",
                self.path,
                writer.rows,
                self.failed,
            )


class ServeSink(Sink):
    """Serves a service's passes to students through a replay window: a batch is computed
    only while some student still needs it (all of them, the first time; after a restart,
    only what the students have not acknowledged)."""

    def __init__(self, window: ReplayWindow, student_grace: float) -> None:
        self.window = window
        self.student_grace = student_grace  # how long the first batch waits for students

    def pass_needed(self, pass_: int) -> bool:
        return self.window.pass_needed(pass_)

    def wants(self, pass_: int, seq: int, ids: np.ndarray) -> Rows | None:
        if (pass_, seq) == (0, 0):
            self.window.wait_for_students(self.student_grace)
        self.window.count_rows((pass_, seq), len(ids))
        return True if self.window.needed((pass_, seq)) else None

    def put(self, pass_: int, seq: int, batch: pa.RecordBatch, rows: Rows) -> int:
        self.window.put((pass_, seq), batch)
        return int(batch.num_rows)

    def end_pass(self, pass_: int, batches: int) -> None:
        self.window.end_pass(pass_, batches)

    def drain(self, stop: threading.Event) -> None:
        while not stop.is_set() and not self.window.wait_drained(timeout=POLL):
            pass

    def fail(self, why: str) -> None:
        self.window.stop(f"its knowledge service failed: {why}", failed=True)
