"""Teacher: runs a model over a data reader; writes the knowledge to a store and/or serves it.

Pantheon's calls keep their names and meaning::

    teacher = Teacher(out_path="knowledge/")          # offline: a store
    teacher = Teacher(out_port=8470)                  # online: a Flight server
    teacher = Teacher(out_path="knowledge/", out_port=8470)   # both at once
    teacher.start()
    teacher.start_knowledge_service(
        feed_list=["image"], schema=["logits"], program=model_fn,
        reader_config={"sample_generator": gen, "batch_size": 64}, use_fp16=True, times=3)
    teacher.close()

``program`` is any callable from a dict of feed arrays to a dict of output arrays.
Reading and inference run on a background thread, encoding (codecs, Arrow) on a small
thread pool, writing and serving on the calling thread; the stages overlap, bounded by
``buf_size`` batches. Sample ids are reader positions unless the reader yields a
``sample_id`` feed.

Offline, when ``start_knowledge_service`` returns, everything it produced is durable and
the store is complete: Pantheon code needs no ``close()``. Later ``dump()`` calls or
services on the same teacher append to the store (sample ids count on) and complete it
again when the teacher closes, when the next service returns, or when the process exits.
A dump that fails leaves the store incomplete, and says so. A store that already holds
rows is resumed: the teacher skips the samples it holds, so re-running an interrupted
dump completes it. Online, the teacher serves ``times`` passes; after a restart it
regenerates, from its (deterministic) reader, only the batches its students still need.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import secrets
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from kdserve.core.batch import from_record_batch, to_record_batch
from kdserve.core.codecs import Fp16
from kdserve.core.prefetch import Prefetcher
from kdserve.core.schema import SAMPLE_ID, Schema
from kdserve.errors import KdserveError, SchemaError, StoreError
from kdserve.online.client import TOKEN_ENV
from kdserve.online.replay import MIN_WINDOW_BYTES, ReplayWindow, WindowStoppedError
from kdserve.online.server import DEFAULT_CHUNK_BYTES, TeacherServer
from kdserve.online.tokens import is_loopback, publish_token, remove_token
from kdserve.store import DEFAULT_SHARD_BYTES, StoreReader, StoreWriter, stored_rows
from kdserve.teacher.feeds import FeedBatch, iter_feed_batches

__all__ = ["Teacher"]

Program = Callable[[dict[str, Any]], Mapping[str, Any]]
_POLL = 0.1
_SHUTDOWN_WAIT = 5.0  # seconds close() waits for open calls to finish
_SERVICE_WAIT = 30.0  # seconds close() waits for a running service to wind down
_log = logging.getLogger("kdserve")
_live: weakref.WeakSet[Teacher] = weakref.WeakSet()  # closed at interpreter exit


@atexit.register
def _close_at_exit() -> None:
    """A process that exits without close() keeps what its teachers wrote (Pantheon style)."""
    for teacher in list(_live):
        teacher.close()


@dataclass
class _Work:
    """One batch on its way from inference to the store and/or the replay window."""

    pass_: int
    seq: int
    future: Future[pa.RecordBatch] | None  # None: the pass is over (``seq`` batches)
    store: np.ndarray | None = None  # which rows to write (None: none; the store has them)
    online: bool = False  # whether a student still needs it


class Teacher:
    """Produces knowledge into a store at ``out_path`` and/or serves it on ``out_port``.

    ``name`` and ``model`` (a free-form description, e.g. "resnet50, ImageNet top-1 76%")
    are recorded in the store's manifest. ``overwrite=True`` starts the store over;
    otherwise an existing store with the same schema is resumed. ``progress`` shows a
    samples/s bar (None: only on a terminal).

    Online, every call needs ``token`` (or ``KDSERVE_TOKEN``); without one the teacher
    makes one, prints it and publishes it for students of its user on this host (a 0600
    file, see :mod:`kdserve.online.tokens`). It binds ``host`` (127.0.0.1 by default) and
    refuses any other address without an explicit token. ``tls_cert``/``tls_key`` (PEM bytes or
    paths) turn on TLS; ``tls_client_ca`` also asks every student for a certificate
    signed by that CA (mutual TLS), which refuses strangers before they send a byte.
    The teacher runs up to ``buf_size`` batches ahead of its
    students, or ``window_bytes`` (64 MiB) when its batches are smaller than that in
    all; each batch travels in slices of ``chunk_bytes`` (16 MiB).
    """

    def __init__(
        self,
        out_path: str | os.PathLike[str] | None = None,
        out_port: int | None = None,
        *,
        host: str = "127.0.0.1",
        token: str | None = None,
        tls_cert: bytes | str | os.PathLike[str] | None = None,
        tls_key: bytes | str | os.PathLike[str] | None = None,
        tls_client_ca: bytes | str | os.PathLike[str] | None = None,
        name: str | None = None,
        model: str | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
        progress: bool | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        window_bytes: int = MIN_WINDOW_BYTES,
        student_grace: float = 2.0,
    ) -> None:
        if out_path is None and out_port is None:
            raise KdserveError("a Teacher needs out_path= (a store), out_port= (serving), or both")
        self.out_path = None if out_path is None else os.fspath(out_path)
        self.out_port = out_port
        self.host = host
        default_name = os.path.basename(os.path.normpath(self.out_path)) if self.out_path else ""
        self.name = name or default_name or f"teacher:{out_port}"
        self.model = model
        self.shard_bytes = shard_bytes
        self.overwrite = overwrite
        self.progress = progress
        self.chunk_bytes = chunk_bytes
        self.window_bytes = window_bytes
        self.student_grace = student_grace
        self.token = token or os.environ.get(TOKEN_ENV)
        self._token_given = self.token is not None
        self._tls = _read_tls(tls_cert, tls_key)
        self._client_ca = _pem(tls_client_ca) if tls_client_ca is not None else None
        self.schema: Schema | None = None
        self._writer: StoreWriter | None = None  # open while a dump is in progress
        self._writer_lock = threading.RLock()  # one thread writes, completes or closes
        self._overwrite = overwrite  # until the store is first opened
        self._failed: str | None = None  # why the store must stay incomplete
        self._server: TeacherServer | None = None
        self._token_file: Path | None = None  # the generated token, published for this host
        self._window: ReplayWindow | None = None
        self._schema_lock = threading.Lock()
        self._position = 0  # reader position of the next sample given to dump()/the service
        self._resume_rows = 0 if overwrite or not self.out_path else stored_rows(self.out_path)
        self._started = False
        self._closed = threading.Event()
        self._services: set[int] = set()  # threads running start_knowledge_service
        self._idle = threading.Condition()  # notified when a service ends

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Pantheon's start(): ready the teacher; online, start listening. Idempotent."""
        if self._closed.is_set():
            raise KdserveError(f"teacher {self.name!r} is closed; create a new Teacher")
        if self._started:
            return
        if self.out_port is not None:
            self._start_server()
        self._started = True
        _live.add(self)

    def _start_server(self) -> None:
        assert self.out_port is not None
        if self.token is None:
            if not is_loopback(self.host):
                raise KdserveError(
                    f"teacher {self.name!r} would listen on {self.host} without a token: pass "
                    f"token= or set {TOKEN_ENV} (only 127.0.0.1 gets a generated token)"
                )
            self.token = secrets.token_urlsafe(18)
        self._server = TeacherServer(
            name=self.name,
            host=self.host,
            port=self.out_port,
            token=self.token,
            schema=None,
            window=None,
            query=None,
            tls=self._tls,
            tls_client_ca=self._client_ca,
            chunk_bytes=self.chunk_bytes,
        )
        if self.name == f"teacher:{self.out_port}":  # the default name: use the real port
            self.name = self._server.name = f"teacher:{self._server.port}"
        self.out_port = self._server.port  # the real port when 0 asked for any
        token_note = ""
        if not self._token_given:  # students of this user on this host find it by itself
            self._token_file = publish_token(self.out_port, self.token)
            token_note = f"; token {self.token} (also in {self._token_file})"
        print(
            f"[kdserve] teacher {self.name} serving on {self.address}{token_note}", file=sys.stderr
        )

    @property
    def address(self) -> str:
        """``host:port`` that students pass as ``in_address`` (online teachers)."""
        return f"{self.host}:{self.out_port}"

    def close(self) -> None:
        """Stop serving and complete the store. Safe from any thread; idempotent.

        A service still running in another thread is stopped between two batches and
        waited for (up to 30 s); its store is left valid and incomplete, so a re-run
        resumes it. A store whose dump failed is never marked complete.
        """
        self._closed.set()
        _live.discard(self)
        if self._window is not None:
            self._window.stop()
        if self._server is not None:
            # Flight's shutdown waits for open calls (a student's idle query exchange, say)
            # without a deadline: give it a few seconds, then let the process go on.
            stopper = threading.Thread(target=self._server.shutdown, daemon=True)
            stopper.start()
            stopper.join(timeout=_SHUTDOWN_WAIT)
            if stopper.is_alive():
                _log.warning(
                    "teacher %s: calls still open after %g s; closing without waiting for them",
                    self.name,
                    _SHUTDOWN_WAIT,
                )
            self._server = None
        if self._token_file is not None:
            remove_token(self._token_file)
            self._token_file = None
        with self._idle:
            others = lambda: not (self._services - {threading.get_ident()})  # noqa: E731
            if not self._idle.wait_for(others, timeout=_SERVICE_WAIT):
                _log.warning(
                    "teacher %s: its knowledge service did not stop within %g s of close(); "
                    "it completes its store when it stops",
                    self.name,
                    _SERVICE_WAIT,
                )
                return
        self._finish_store()

    def _finish_store(self) -> None:
        """Make every written row durable and close the writer; mark the store complete
        unless a dump failed or was interrupted (then a re-run resumes it)."""
        with self._writer_lock:
            if self._writer is None:
                return
            writer, self._writer = self._writer, None
            if self._failed is None:
                writer.close()
                return
            writer.close(complete=False)
            _log.warning(
                "teacher %s: store %s left incomplete (%d samples durable) because %s; "
                "re-run the dump to complete it",
                self.name,
                self.out_path,
                writer.rows,
                self._failed,
            )

    def __enter__(self) -> Teacher:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and self._failed is None:
            self._failed = f"the `with` block raised {exc_type.__name__}"
        self.close()

    def _check_started(self) -> None:
        if self._closed.is_set():
            raise KdserveError(f"teacher {self.name!r} is closed; create a new Teacher")
        if not self._started:
            raise KdserveError(f"call start() on teacher {self.name!r} first (or use `with`)")

    # -- schema and store -----------------------------------------------------------

    def _publish_schema(self, schema: Schema) -> None:
        """Fix the knowledge schema: open the store for it and tell the server."""
        with self._schema_lock:
            if self.schema is None:
                self.schema = schema.with_metadata(teacher=self.name)
                if self.out_path is not None:
                    try:
                        self._store()
                    except BaseException:
                        self.schema = None
                        raise
                if self._server is not None:
                    self._server.schema = self.schema.to_arrow()
            elif schema.with_metadata(teacher=self.name) != self.schema:
                raise SchemaError(
                    f"teacher {self.name!r} produces {self.schema.describe()}; a batch with "
                    f"{schema.describe()} does not fit"
                )

    def _store(self) -> StoreWriter:
        """The store's writer, opened on first use and opened again (resuming the store)
        for a dump that continues after the store was completed."""
        assert self.out_path is not None and self.schema is not None
        with self._writer_lock:
            if self._writer is None:
                self._writer = StoreWriter(
                    self.out_path,
                    self.schema,
                    shard_bytes=self.shard_bytes,
                    overwrite=self._overwrite,
                    teacher={"name": self.name, **({"model": self.model} if self.model else {})},
                )
                if self._resume_rows and self._position == 0:
                    print(
                        f"[kdserve] resuming store {self.out_path}: the {self._resume_rows} "
                        f"samples it holds are skipped",
                        file=sys.stderr,
                    )
                self._overwrite = False
            return self._writer

    def _write(self, batch: pa.RecordBatch) -> None:
        """Append rows to the store (opened again if a finished service completed it)."""
        with self._writer_lock:
            self._store().write(batch)

    def _stored_schema(self, names: list[str], use_fp16: bool) -> Schema:
        """The schema of the store being resumed, if it is what ``names``/``use_fp16`` ask for."""
        assert self.out_path is not None
        stored = StoreReader(self.out_path).schema
        floats = [f for f in stored if f.dtype.kind == "f" and f.dtype.itemsize > 2]
        if stored.names != names or any((f.codec == Fp16()) != use_fp16 for f in floats):
            raise StoreError(
                f"the store at {self.out_path} holds {stored.describe()}, but this dump keeps "
                f"{names} with use_fp16={use_fp16}; dump to another directory or pass "
                f"overwrite=True",
                path=self.out_path,
            )
        return stored

    @property
    def rows_stored(self) -> int:
        """Rows in the store so far (including those found when resuming)."""
        with self._writer_lock:
            if self._writer is not None:
                return self._writer.rows
        return stored_rows(self.out_path) if self.out_path else 0

    def _to_store(self, ids: np.ndarray) -> np.ndarray | None:
        """Which of a batch's samples the store still needs (by id: a resumed or repaired
        store is completed whatever its gaps); None when it holds them all."""
        if not self._resume_rows:  # a new store holds only new ids: no lock, no lookup
            return np.ones(len(ids), bool)
        with self._writer_lock:
            missing = ~self._store().holds(ids)
        return missing if missing.any() else None

    # -- offline: dump --------------------------------------------------------------

    def dump(self, knowledge: Mapping[str, Any]) -> None:
        """Write one batch of knowledge to the store (Pantheon's offline ``dump``).

        The first batch fixes the schema (inferred from its arrays). Sample ids come from
        ``knowledge["sample_id"]`` or count on from the previous batch. On a resumed
        store, rows it already holds are skipped.
        """
        self._check_started()
        if self.out_path is None:
            raise KdserveError(f"teacher {self.name!r} has no out_path; dump() writes a store")
        data = dict(knowledge)
        n = _batch_length(data)  # every field is checked against it when the batch is built
        ids = np.asarray(data.pop(SAMPLE_ID)) if SAMPLE_ID in data else None
        if ids is None:
            ids = np.arange(self._position, self._position + n, dtype=np.int64)
        self._publish_schema(self.schema or Schema.from_arrays(data))
        assert self.schema is not None
        batch = to_record_batch(data, self.schema, ids)
        self._position += n
        rows = self._to_store(ids)
        if rows is not None:
            self._write(_rows(batch, rows))

    # -- the service ----------------------------------------------------------------

    def start_knowledge_service(
        self,
        feed_list: Sequence[str],
        schema: Sequence[str] | Mapping[str, Any] | Schema,
        program: Program,
        reader_config: Any,
        exe: Any = None,
        buf_size: int = 10,
        use_fp16: bool = False,
        times: int = 1,
        num_postprocess_threads: int = 2,
        num_inference_threads: int = 1,
    ) -> int:
        """Run ``program`` over the reader; store and/or serve the knowledge.

        ``schema`` names the fields to keep -- program outputs, or feeds passed through --
        or maps each knowledge name to the output or feed it is taken from (Pantheon's
        ``{"name": variable}``), or is a :class:`Schema` that declares them (with codecs).
        ``exe`` is accepted for Pantheon's call shape and unused (the program runs
        itself). ``use_fp16`` stores float fields as float16. Online, ``times`` passes
        are served (each student call of its generator takes the next) and this returns
        when every student has received the last one; a store is written in the first
        pass. Online with ``reader_config=None``, the teacher only answers queries, until
        :meth:`close`. Returns the samples this call delivered (written to the store, or
        served over all passes). Offline, the store is complete and durable when this
        returns; if it raises, the store is left incomplete and a re-run resumes it.

        ``num_postprocess_threads`` encode batches (codecs, Arrow) in parallel. With
        ``num_inference_threads`` > 1 the program itself is called from that many threads
        at once (order is kept): use it with a program that is safe to call concurrently,
        such as :func:`kdserve.torch.teacher_program` with one replica per device. (Without
        a declared :class:`Schema`, the first batch runs alone, to learn the schema.)
        """
        self._check_started()
        online = self._server is not None
        if times < 1 or (times != 1 and not online):
            raise ValueError(
                f"times={times}: a store is written once and students read it as often as "
                f"they like; times > 1 is for online service (out_port=)"
            )
        if min(buf_size, num_postprocess_threads, num_inference_threads) < 1:
            raise ValueError(
                "buf_size, num_postprocess_threads and num_inference_threads must be >= 1"
            )
        names, sources = _knowledge_names(schema)
        declared = schema if isinstance(schema, Schema) else None
        if declared is not None:
            self._publish_schema(declared)
        elif self.out_path is not None and self._resume_rows and self.schema is None:
            # Resuming: check this run against the store now, even if it skips every sample.
            self._publish_schema(self._stored_schema(names, use_fp16))
        encode = _Encoder(
            program, names, sources, use_fp16, lambda: self.schema, self._publish_schema
        )
        encode.feeds = [f for f in feed_list if f != SAMPLE_ID]
        if reader_config is None and not online:
            raise ValueError("reader_config=None (queries only) needs out_port=")
        if online and reader_config is not None:
            # The window first: a student must never see this teacher as query-only.
            self._window = ReplayWindow(times, buf_size, self.window_bytes)
            assert self._server is not None
            self._server.window = self._window
        if self._server is not None:
            self._server.query = encode.query
        if reader_config is None:
            self._closed.wait()
            return encode.samples
        with self._idle:
            self._services.add(threading.get_ident())
        try:
            return self._serve(
                feed_list,
                reader_config,
                encode,
                times,
                buf_size,
                max(num_postprocess_threads, num_inference_threads),
                num_inference_threads > 1,
            )
        finally:
            with self._idle:
                self._services.discard(threading.get_ident())
                self._idle.notify_all()
            # Durable now, and complete unless it failed or close() stopped it: Pantheon
            # code calls no close().
            self._finish_store()

    def _serve(
        self,
        feed_list: Sequence[str],
        reader_config: Any,
        encode: _Encoder,
        times: int,
        buf_size: int,
        threads: int,
        concurrent: bool,
    ) -> int:
        """The pipeline of one service call; records why it failed, if it did."""
        work = self._produce(feed_list, reader_config, encode, times, threads, concurrent)
        delivered = 0
        try:
            delivered = self._consume(Prefetcher(work, buf_size, name="kdserve-infer"))
            if self._window is not None and not self._closed.is_set():
                while not self._window.wait_drained(timeout=_POLL):
                    pass
        except BaseException as exc:
            if not (isinstance(exc, WindowStoppedError) and self._closed.is_set()):
                self._failed = self._failed or f"its dump failed ({type(exc).__name__}: {exc})"
                if self._window is not None:  # students waiting for batches hear of it now
                    self._window.stop(f"its knowledge service failed: {type(exc).__name__}: {exc}")
                raise
        if self._closed.is_set():  # close() was called while serving
            self._failed = self._failed or "close() stopped its dump"
            _log.warning("teacher %s: close() stopped its knowledge service", self.name)
        return delivered

    def _produce(
        self,
        feed_list: Sequence[str],
        reader_config: Any,
        encode: _Encoder,
        times: int,
        threads: int,
        concurrent: bool,
    ) -> Callable[[], Iterator[_Work]]:
        """Reading and inference, as a generator factory for the background thread.
        ``concurrent``: inference runs on the pool's threads too, several at once."""

        base = self._position  # a later service on this teacher counts sample ids on

        def work() -> Iterator[_Work]:
            window = self._window
            with ThreadPoolExecutor(threads, thread_name_prefix="kdserve-encode") as pool:
                for p in range(times):
                    if p and window is not None and not window.pass_needed(p):
                        continue  # every student is past this pass (a restarted teacher)
                    count = 0
                    self._position = base
                    for seq, feed in enumerate(iter_feed_batches(reader_config, feed_list)):
                        count += 1
                        n = _batch_length(feed)
                        position = self._position
                        self._position += n
                        ids = feed.get(SAMPLE_ID)
                        ids = np.arange(position, position + n) if ids is None else np.asarray(ids)
                        early = None  # the first batch's knowledge: students need the schema
                        if self.schema is None:
                            early = encode.first(feed)
                        store = self._to_store(ids) if p == 0 and self.out_path else None
                        if window is not None and seq == 0 and p == 0:
                            window.wait_for_students(self.student_grace)
                        if window is not None:
                            window.count_rows((p, seq), n)
                        needed = window is not None and window.needed((p, seq))
                        if store is not None or needed:
                            if early is not None:
                                future = pool.submit(encode.batch, early, ids)
                            elif concurrent:  # several model replicas run at once
                                future = pool.submit(encode.infer_batch, feed, ids)
                            else:
                                future = pool.submit(encode.batch, encode.infer(feed), ids)
                            yield _Work(p, seq, future, store, needed)
                    if count == 0 and p == 0:
                        raise SchemaError("the reader yielded no batches; check reader_config")
                    if count == 0:
                        raise KdserveError(
                            f"the reader yielded nothing on pass {p}: it can be read only once. "
                            f"Give a generator function (Pantheon) or a re-iterable such as a "
                            f"list or a DataLoader"
                        )
                    if window is not None:
                        yield _Work(p, count, None)

        return work

    def _consume(self, work: Prefetcher[_Work]) -> int:
        """Write and serve batches in order (the calling thread's part of the pipeline);
        return the samples delivered (stored or served)."""
        delivered = 0
        quiet = self.progress is False or (self.progress is None and not sys.stderr.isatty())
        with tqdm(desc=f"teacher {self.name}", unit=" samples", disable=quiet) as bar:
            for item in work:
                if self._closed.is_set():
                    break  # close() from another thread: stop between two batches
                if item.future is None:
                    assert self._window is not None
                    self._window.end_pass(item.pass_, item.seq)
                    continue
                batch = item.future.result()
                stored = 0
                if item.store is not None:
                    self._write(_rows(batch, item.store))
                    stored = int(item.store.sum())
                if item.online:
                    assert self._window is not None
                    self._window.put((item.pass_, item.seq), batch)
                rows = batch.num_rows if item.online else stored
                delivered += rows
                bar.update(rows)
        return delivered

    # -- messages -------------------------------------------------------------------

    def send(self, message: Any) -> None:
        """Send a message (JSON values and numpy arrays) to every student (online)."""
        self._online("send").broadcast(message)

    def recv(self, timeout: float | None = None) -> Any:
        """The next message from a student; waits up to ``timeout`` seconds (None: forever,
        interruptible). Raises TimeoutError when none came."""
        server = self._online("recv")
        waited = 0.0
        while timeout is None or waited < timeout:
            step = _POLL if timeout is None else min(_POLL, timeout - waited)
            try:
                return server.inbox.get(timeout=step)[1]
            except queue.Empty:
                waited += step
            if self._closed.is_set():
                break
        raise TimeoutError(f"no message reached teacher {self.name!r} within {timeout} s")

    def _online(self, what: str) -> TeacherServer:
        self._check_started()
        if self._server is None:
            raise KdserveError(f"{what}() needs an online teacher (out_port=)")
        return self._server


class _Encoder:
    """Turns program outputs into knowledge batches, for passes and for queries."""

    def __init__(
        self,
        program: Program,
        names: list[str],
        sources: list[str],
        use_fp16: bool,
        schema: Callable[[], Schema | None],
        publish: Callable[[Schema], None],
    ) -> None:
        self.schema = schema
        self.publish = publish
        self.program = program
        self.names = names
        self.sources = sources  # the output or feed each knowledge field is taken from
        self.use_fp16 = use_fp16
        self.samples = 0
        self._counting = threading.Lock()  # infer() may run on several threads
        self.feeds: list[str] = []  # what a query must hold

    def infer(self, feed: FeedBatch) -> dict[str, Any]:
        """Run the program on one feed batch and pick the fields to keep."""
        outputs = self.program(feed)
        if not isinstance(outputs, Mapping):
            raise SchemaError(
                f"program must return a dict of output arrays, got {type(outputs).__name__}"
            )
        knowledge = {}
        for n, source in zip(self.names, self.sources, strict=True):
            if source in outputs:
                knowledge[n] = _to_numpy(outputs[source])
            elif source in feed:
                knowledge[n] = feed[source]
            else:
                raise SchemaError(
                    f"schema field {n!r} is neither a program output {sorted(outputs)} "
                    f"nor a feed {sorted(feed)}",
                    field=n,
                )
        with self._counting:
            self.samples += _batch_length(feed)
        return knowledge

    def first(self, feed: FeedBatch) -> dict[str, Any]:
        """Infer and publish the schema from the first batch; return its knowledge, so
        that it is not computed twice."""
        knowledge = self.infer(feed)
        self.publish(_infer_schema(knowledge, self.use_fp16))
        return knowledge

    def infer_batch(self, feed: FeedBatch, ids: np.ndarray) -> pa.RecordBatch:
        """Inference and encoding in one step (for concurrent inference)."""
        return self.batch(self.infer(feed), ids)

    def batch(self, knowledge: dict[str, Any], ids: np.ndarray) -> pa.RecordBatch:
        schema = self.schema()
        assert schema is not None
        return to_record_batch(knowledge, schema, ids)

    def query(self, inputs: pa.RecordBatch) -> pa.RecordBatch:
        """Query mode: a batch of a student's feeds -> the knowledge for it."""
        feed = from_record_batch(inputs)
        ids = feed.pop(SAMPLE_ID)
        missing = [f for f in self.feeds if f not in feed]
        if missing:
            raise SchemaError(
                f"the query lacks feed(s) {missing}: it has {sorted(feed)}, the teacher reads "
                f"{self.feeds}",
                field=missing[0],
            )
        knowledge = self.infer(feed)
        if self.schema() is None:
            self.publish(_infer_schema(knowledge, self.use_fp16))
        return self.batch(knowledge, ids)


def _knowledge_names(
    schema: Sequence[str] | Mapping[str, Any] | Schema,
) -> tuple[list[str], list[str]]:
    """The knowledge fields a service keeps, and the output or feed each is taken from:
    a Pantheon-style mapping ``{name: source}`` names its sources (a non-string source,
    such as a framework variable, means the field's own name)."""
    if isinstance(schema, Schema):
        names = list(schema.names)
        sources = names
    elif isinstance(schema, Mapping):
        names = list(schema)
        sources = [v if isinstance(v, str) else n for n, v in schema.items()]
    elif isinstance(schema, str) or not isinstance(schema, Iterable):
        raise SchemaError(
            f"schema must be a list of field names, a dict {{name: output}} or a Schema, "
            f"got {type(schema).__name__}"
        )
    else:
        names = list(schema)
        sources = names
    if not names:
        raise SchemaError("schema must name at least one field to keep")
    bad = [n for n in [*names, *sources] if not isinstance(n, str) or not n]
    if bad:
        raise SchemaError(f"schema field names must be non-empty strings, got {bad[0]!r}")
    return names, sources


def _rows(batch: pa.RecordBatch, mask: np.ndarray) -> pa.RecordBatch:
    """The rows of ``batch`` that ``mask`` selects (the batch itself when it selects all)."""
    return batch if mask.all() else batch.filter(pa.array(mask))


def _batch_length(data: Mapping[str, Any]) -> int:
    if not data:
        raise SchemaError("an empty knowledge batch has no fields")
    return len(next(iter(data.values())))


def _to_numpy(value: Any) -> Any:
    """Program outputs may be framework tensors; numpy arrays and lists pass through."""
    if isinstance(value, (np.ndarray, list)):
        return value
    if hasattr(value, "detach"):  # a torch tensor, possibly on a device
        value = value.detach().cpu()
    return np.asarray(value)


def _infer_schema(knowledge: Mapping[str, Any], use_fp16: bool) -> Schema:
    schema = Schema.from_arrays(knowledge)
    if not use_fp16:
        return schema
    floats = [f.name for f in schema if f.dtype.kind == "f" and f.dtype.itemsize > 2]
    return schema.with_codecs(dict.fromkeys(floats, "fp16"))


def _read_tls(
    cert: bytes | str | os.PathLike[str] | None, key: bytes | str | os.PathLike[str] | None
) -> tuple[bytes, bytes] | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise KdserveError("TLS needs both tls_cert= and tls_key= (PEM bytes or file paths)")
    return _pem(cert), _pem(key)


def _pem(value: bytes | str | os.PathLike[str]) -> bytes:
    """PEM bytes, given as bytes or as a file path."""
    return value if isinstance(value, bytes) else Path(value).read_bytes()
