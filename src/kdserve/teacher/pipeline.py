"""Pipeline: one knowledge service's threads. Reading runs on a background thread, which
keeps the program's lanes (:mod:`kdserve.core.lanes`) one call ahead; encoding (codecs,
Arrow) runs on a small pool, delivery to the sinks on the calling thread. The stages
overlap, bounded by ``buf_size`` batches, and all of them watch one stop signal, so a
stop takes effect between two batches."""

from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from kdserve.core.lanes import Lanes
from kdserve.core.prefetch import Prefetcher
from kdserve.core.schema import SAMPLE_ID
from kdserve.errors import KdserveError, SchemaError
from kdserve.online.replay import WindowStoppedError
from kdserve.teacher.encoder import Encoder, batch_length, program_submit
from kdserve.teacher.feeds import FeedBatch, iter_feed_batches
from kdserve.teacher.sinks import Rows, Sink

__all__ = ["Pipeline"]


@dataclass
class _Work:
    """One batch on its way from inference to the sinks that want it."""

    pass_: int
    seq: int  # the batch's number in its pass; for the end of a pass, the pass's batches
    future: Future[pa.RecordBatch] | None  # None: the pass is over
    wants: list[tuple[Sink, Rows]] = field(default_factory=list)


@dataclass
class _Queued:
    """A feed batch whose program call was submitted to a lane, waiting for its outputs."""

    seq: int
    feed: dict[str, Any]
    ids: np.ndarray
    wants: list[tuple[Sink, Rows]]
    future: Future[Any]


def _submitted(submit: Callable[[Any], Any], feed: dict[str, Any]) -> Future[Any]:
    """``submit(feed)``, checked to be the Future the program protocol asks for."""
    future = submit(feed)
    if not isinstance(future, Future):
        raise TypeError(
            f"the program's submit(feed) must return a concurrent.futures.Future of what "
            f"program(feed) returns, got {type(future).__name__}"
        )
    return future


class Pipeline:
    """Runs ``encoder`` over ``times`` passes of a reader into ``sinks``.

    Sample ids are reader positions counted from ``base`` unless the reader yields a
    ``sample_id`` feed; ``position`` is the next one after the run. ``calls`` is how many
    program calls run at once, each with one more queued behind it: on the program's own
    lanes if it has ``submit`` (a ``teacher_program``), else on ``calls`` lanes of the
    pipeline's. ``threads`` encode.
    """

    def __init__(
        self,
        reader_config: Any,
        feed_list: Sequence[str],
        encoder: Encoder,
        sinks: Sequence[Sink],
        *,
        stop: threading.Event,
        times: int = 1,
        base: int = 0,
        buf_size: int = 10,
        threads: int = 2,
        calls: int = 1,
        label: str = "teacher",
        progress: bool | None = None,
    ) -> None:
        self.reader_config = reader_config
        self.feed_list = list(feed_list)
        self.encoder = encoder
        self.sinks = list(sinks)
        self.stop = stop
        self.times = times
        self.base = base
        self.position = base
        self.buf_size = buf_size
        self.threads = threads
        self.calls = calls
        self.label = label
        self.progress = progress

    def run(self) -> int:
        """Run every pass; return the samples delivered. A failure is told to every sink
        (a store stays incomplete, waiting students hear of it) and re-raised."""
        work = Prefetcher(self._produce, self.buf_size, "kdserve-read", on_wait=self._stopping)
        items = iter(work)  # held here, so it is closed below, after the sinks hear why
        interrupted = False
        try:
            delivered = self._deliver(items)
            for sink in self.sinks:
                sink.drain(self.stop)
        except BaseException as exc:
            if not (isinstance(exc, WindowStoppedError) and self.stop.is_set()):
                for sink in self.sinks:  # wakes a reading thread waiting on a sink
                    sink.fail(f"{type(exc).__name__}: {exc}")
                interrupted = isinstance(exc, KeyboardInterrupt)
                raise
            delivered = 0
        finally:
            if interrupted or self.stop.is_set():  # never wait for a program that may hang
                work.close(wait=0.0)
            else:
                work.close()
        return delivered

    def _stopping(self, waited: float) -> None:
        """While the delivering thread waits for the next batch: a stop (the teacher
        closing) ends the wait, though the program may be busy (or hung) in a call."""
        if self.stop.is_set():
            raise _StoppedError

    def _produce(self) -> Iterator[_Work]:
        """Reading, and inference submitted to the program's lanes (or the pipeline's own,
        for a plain program), one call queued behind each running one: the background
        thread's part."""
        submit = program_submit(self.encoder.program)
        lanes = None
        if submit is None:
            lanes = Lanes(self.calls, "kdserve-call")
            submit = partial(lanes.submit, self._call)
        try:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="kdserve-encode") as pool:
                for p in range(self.times):
                    if p == 0 or any(s.pass_needed(p) for s in self.sinks):
                        yield from self._pass(p, submit, pool)
                    # else every student is past this pass (a restarted teacher)
        finally:
            if lanes is not None:
                lanes.stop()

    def _pass(
        self, p: int, submit: Callable[[FeedBatch], Any], pool: ThreadPoolExecutor
    ) -> Iterator[_Work]:
        """One pass over the reader."""
        encoder = self.encoder
        count = 0
        self.position = self.base
        queued: deque[_Queued] = deque()  # calls submitted, oldest first
        try:
            for seq, feed in enumerate(iter_feed_batches(self.reader_config, self.feed_list, p)):
                if self.stop.is_set():
                    return
                count += 1
                ids = self._ids(feed)
                if encoder.schema() is None:  # students need the schema: the first batch alone
                    knowledge = encoder.first(feed, _submitted(submit, feed).result())
                    wants = self._wants(p, seq, ids)
                    if wants:
                        yield _Work(p, seq, pool.submit(encoder.batch, knowledge, ids), wants)
                    continue
                wants = self._wants(p, seq, ids)
                if not wants:
                    continue
                queued.append(_Queued(seq, feed, ids, wants, _submitted(submit, feed)))
                while len(queued) >= 2 * self.calls:
                    yield self._finish(p, queued.popleft(), pool)
            while queued:
                yield self._finish(p, queued.popleft(), pool)
        finally:  # stopped or failed: calls not yet started never run
            for call in queued:
                call.future.cancel()
        _check_count(count, p)
        yield _Work(p, count, None)

    def _wants(self, p: int, seq: int, ids: np.ndarray) -> list[tuple[Sink, Rows]]:
        """The sinks that want batch ``(p, seq)``, with the rows each wants."""
        return [(s, r) for s in self.sinks if (r := s.wants(p, seq, ids)) is not None]

    def _call(self, lane: int, feed: FeedBatch) -> Any:
        """A plain program's call, on one of the pipeline's lanes."""
        return self.encoder.program(feed)

    def _finish(self, pass_: int, call: _Queued, pool: ThreadPoolExecutor) -> _Work:
        """Wait for a submitted call's outputs; hand its knowledge to the encoding pool."""
        knowledge = self.encoder.knowledge(call.feed, call.future.result())
        future = pool.submit(self.encoder.batch, knowledge, call.ids)
        return _Work(pass_, call.seq, future, call.wants)

    def _ids(self, feed: dict[str, Any]) -> np.ndarray:
        """A feed batch's sample ids: its ``sample_id`` feed, or reader positions."""
        n = batch_length(feed)
        start, self.position = self.position, self.position + n
        ids = feed.get(SAMPLE_ID)
        return np.arange(start, start + n) if ids is None else np.asarray(ids)

    def _deliver(self, work: Iterator[_Work]) -> int:
        """Hand batches to their sinks in order (the calling thread's part)."""
        delivered = 0
        quiet = self.progress is False or (self.progress is None and not sys.stderr.isatty())
        with tqdm(desc=self.label, unit=" samples", disable=quiet) as bar:
            try:
                for item in work:
                    if self.stop.is_set():
                        break  # stop between two batches
                    if item.future is None:
                        for sink in self.sinks:
                            sink.end_pass(item.pass_, item.seq)
                        continue
                    batch = item.future.result()
                    rows = max(s.put(item.pass_, item.seq, batch, r) for s, r in item.wants)
                    delivered += rows
                    bar.update(rows)
            except _StoppedError:  # stopped while the next batch was awaited
                pass
        return delivered


class _StoppedError(Exception):
    """The pipeline was stopped while its delivering thread awaited the next batch."""


def _check_count(count: int, pass_: int) -> None:
    """A reader that yields nothing is a mistake; one that yields only once cannot serve
    more than one pass."""
    if count == 0 and pass_ == 0:
        raise SchemaError("the reader yielded no batches; check reader_config")
    if count == 0:
        raise KdserveError(
            f"the reader yielded nothing on pass {pass_}: it can be read only once. Give a "
            f"generator function (Pantheon) or a re-iterable such as a list or a DataLoader"
        )
