"""Pipeline: one knowledge service's threads. Reading and inference run on a background
thread (or, for a program that can ``submit``, on the program's own threads, fed ahead
by it), encoding (codecs, Arrow) on a small pool, delivery to the sinks on the calling
thread; the stages overlap, bounded by ``buf_size`` batches, and all of them watch one
stop signal, so a stop takes effect between two batches."""

from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from kdserve.core.prefetch import Prefetcher
from kdserve.core.schema import SAMPLE_ID
from kdserve.errors import KdserveError, SchemaError
from kdserve.online.replay import WindowStoppedError
from kdserve.teacher.encoder import Encoder, batch_length, program_submit
from kdserve.teacher.feeds import iter_feed_batches
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
    """A feed batch whose program call was submitted (a program with ``submit``)."""

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
    program calls run at once: a program with ``submit`` (a ``teacher_program``) gets
    one more queued behind each, so its lanes never wait for this thread; another with
    ``calls`` > 1 is called from that many of the pool's threads.
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
        try:
            work = Prefetcher(self._produce, self.buf_size, name="kdserve-infer")
            delivered = self._deliver(work)
            for sink in self.sinks:
                sink.drain(self.stop)
        except BaseException as exc:
            if not (isinstance(exc, WindowStoppedError) and self.stop.is_set()):
                for sink in self.sinks:
                    sink.fail(f"{type(exc).__name__}: {exc}")
                raise
            delivered = 0
        return delivered

    def _produce(self) -> Iterator[_Work]:
        """Reading and inference (the background thread's part)."""
        encoder = self.encoder
        submit = program_submit(encoder.program)
        threads = self.threads if submit is not None else max(self.threads, self.calls)
        with ThreadPoolExecutor(threads, thread_name_prefix="kdserve-encode") as pool:
            for p in range(self.times):
                if p and not any(s.pass_needed(p) for s in self.sinks):
                    continue  # every student is past this pass (a restarted teacher)
                count = 0
                self.position = self.base
                queued: deque[_Queued] = deque()  # calls submitted, oldest first
                try:
                    for seq, feed in enumerate(
                        iter_feed_batches(self.reader_config, self.feed_list, p)
                    ):
                        if self.stop.is_set():
                            return
                        count += 1
                        ids = self._ids(feed)
                        early = encoder.first(feed) if encoder.schema() is None else None
                        wants = [
                            (s, r) for s in self.sinks if (r := s.wants(p, seq, ids)) is not None
                        ]
                        if not wants:
                            continue
                        if early is not None:  # students need the schema: it ran alone
                            yield _Work(p, seq, pool.submit(encoder.batch, early, ids), wants)
                        elif submit is not None:  # a call queued behind each running one
                            queued.append(_Queued(seq, feed, ids, wants, _submitted(submit, feed)))
                            while len(queued) >= 2 * self.calls:
                                yield self._finish(p, queued.popleft(), pool)
                        elif self.calls > 1:
                            future = pool.submit(encoder.infer_batch, feed, ids)
                            yield _Work(p, seq, future, wants)
                        else:
                            future = pool.submit(encoder.batch, encoder.infer(feed), ids)
                            yield _Work(p, seq, future, wants)
                    while queued:
                        yield self._finish(p, queued.popleft(), pool)
                finally:  # stopped or failed: calls not yet started never run
                    for call in queued:
                        call.future.cancel()
                _check_count(count, p)
                yield _Work(p, count, None)

    def _finish(self, pass_: int, call: _Queued, pool: ThreadPoolExecutor) -> _Work:
        """Wait for a submitted call's outputs; hand its knowledge to the encoding pool."""
        knowledge = self.encoder.knowledge(call.feed, call.future.result())
        return _Work(
            pass_, call.seq, pool.submit(self.encoder.batch, knowledge, call.ids), call.wants
        )

    def _ids(self, feed: dict[str, Any]) -> np.ndarray:
        """A feed batch's sample ids: its ``sample_id`` feed, or reader positions."""
        n = batch_length(feed)
        start, self.position = self.position, self.position + n
        ids = feed.get(SAMPLE_ID)
        return np.arange(start, start + n) if ids is None else np.asarray(ids)

    def _deliver(self, work: Prefetcher[_Work]) -> int:
        """Hand batches to their sinks in order (the calling thread's part)."""
        delivered = 0
        quiet = self.progress is False or (self.progress is None and not sys.stderr.isatty())
        with tqdm(desc=self.label, unit=" samples", disable=quiet) as bar:
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
        return delivered


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
