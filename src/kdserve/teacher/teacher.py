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

``program`` is any callable from a dict of feed arrays to a dict of output arrays. The
façade wires small parts: an :class:`~kdserve.teacher.encoder.Encoder` (program outputs
-> Arrow batches), a :class:`~kdserve.teacher.pipeline.Pipeline` (the service's threads)
and sinks (:mod:`kdserve.teacher.sinks`: the store, the students' replay window).

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
import json
import logging
import math
import os
import queue
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kdserve._version import __version__
from kdserve.core.batch import to_record_batch
from kdserve.core.schema import SAMPLE_ID, Schema
from kdserve.core.wait import POLL, slices
from kdserve.errors import KdserveError, SchemaError
from kdserve.online.limits import Limits
from kdserve.online.protocol import (
    MAX_PROVENANCE_BYTES,
    MAX_PROVENANCE_ITEMS,
    MAX_PROVENANCE_NAME,
)
from kdserve.online.replay import MIN_WINDOW_BYTES, ReplayWindow
from kdserve.online.server import DEFAULT_CHUNK_BYTES, TeacherServer
from kdserve.online.wire import MAX_TEXT_CHARS
from kdserve.store import DEFAULT_SHARD_BYTES, Compression
from kdserve.teacher.encoder import (
    Encoder,
    Keep,
    Program,
    batch_length,
    check_program,
    knowledge_names,
    program_concurrency,
)
from kdserve.teacher.pipeline import Pipeline
from kdserve.teacher.security import Pem, Security
from kdserve.teacher.sinks import ServeSink, Sink, StoreSink

__all__ = ["Teacher", "checked_provenance"]

_SHUTDOWN_WAIT = 5.0  # seconds close() waits for open calls to finish
_SERVICE_WAIT = 30.0  # seconds close() waits for a running service to wind down
_log = logging.getLogger(__name__)
_live: weakref.WeakSet[Teacher] = weakref.WeakSet()  # closed at interpreter exit


@atexit.register
def _close_at_exit() -> None:
    """A process that exits without close() keeps what its teachers wrote (Pantheon style)."""
    for teacher in list(_live):
        teacher.close()


class Teacher:
    """Produces knowledge into a store at ``out_path`` and/or serves it on ``out_port``.

    ``name`` and ``model`` (a free-form description, e.g. "resnet50, ImageNet top-1 76%")
    are recorded in the store's manifest. ``overwrite=True`` starts the store over;
    otherwise an existing store with the same schema is resumed. ``compression="zstd"``
    (or ``"lz4"``) compresses the store's shards (:class:`~kdserve.StoreWriter`).
    ``progress`` shows a samples/s bar (None: only on a terminal).

    Online, every call needs ``token`` (or ``KDSERVE_TOKEN``); without one the teacher
    makes one and publishes it for students of its user on this host (a 0600 file, see
    :mod:`kdserve.online.tokens`; ``teacher.token`` holds it). It binds ``host``
    (127.0.0.1 by default) and refuses any other address without an explicit token.
    ``tls_cert``/``tls_key`` (PEM bytes or paths) turn on TLS; ``tls_client_ca`` also asks
    every student for a certificate signed by that CA (mutual TLS), which refuses
    strangers before they send a byte. The teacher runs up to ``buf_size`` batches ahead
    of its students, or ``window_bytes`` (64 MiB) when its batches are smaller than that
    in all; each batch travels in slices of ``chunk_bytes`` (16 MiB). ``limits``
    (:class:`~kdserve.Limits`) bounds what students may send.

    ``provenance`` records what makes this knowledge comparable with other teachers' --
    e.g. ``{"vocab_size": 32000, "tokenizer": "<hash>", "temperature": 1.0, "revision":
    "v2"}`` (at most 64 names, to strings, numbers or booleans) -- in the store, and
    online in the teacher's info; students can require it (``Student(expect=...)``), and
    a store is never resumed by a dump of other provenance. The kdserve version is
    recorded beside it (``kdserve_version``: in a store, the version that last wrote it;
    it never keeps a dump from resuming a store).
    """

    def __init__(
        self,
        out_path: str | os.PathLike[str] | None = None,
        out_port: int | None = None,
        *,
        host: str = "127.0.0.1",
        token: str | None = None,
        tls_cert: Pem | None = None,
        tls_key: Pem | None = None,
        tls_client_ca: Pem | None = None,
        name: str | None = None,
        model: str | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
        compression: Compression = None,
        progress: bool | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        window_bytes: int = MIN_WINDOW_BYTES,
        student_grace: float = 2.0,
        limits: Limits | None = None,
        provenance: Mapping[str, str | int | float | bool] | None = None,
    ) -> None:
        if out_path is None and out_port is None:
            raise KdserveError("a Teacher needs out_path= (a store), out_port= (serving), or both")
        self.out_path = None if out_path is None else os.fspath(out_path)
        if self.out_path is not None and not self.out_path.strip():
            raise KdserveError(
                "out_path is empty: give the store's directory (an empty path would write "
                "into the current directory)"
            )
        self.out_port = out_port
        self.host = host
        default_name = os.path.basename(os.path.normpath(self.out_path)) if self.out_path else ""
        self.name = name or default_name or f"teacher:{out_port}"
        self.model = model
        self.progress = progress
        self.chunk_bytes = chunk_bytes
        self.window_bytes = window_bytes
        self.student_grace = student_grace
        self.limits = limits or Limits()
        self.provenance = checked_provenance(provenance or {})
        if out_port is not None and model is not None and len(model) > MAX_TEXT_CHARS:
            raise KdserveError(
                f"model= is {len(model)} characters; an online teacher reports at most "
                f"{MAX_TEXT_CHARS} (describe the model, and record the rest in provenance=)"
            )
        self.schema: Schema | None = None
        self._security = Security(token, tls_cert, tls_key, tls_client_ca)
        self._store: StoreSink | None = None
        if self.out_path is not None:
            teacher: dict[str, Any] = {"name": self.name, **({"model": model} if model else {})}
            teacher["kdserve_version"] = __version__  # not part of provenance: resumes ignore it
            if self.provenance:
                teacher["provenance"] = self.provenance
            self._store = StoreSink(self.out_path, teacher, shard_bytes, overwrite, compression)
        self._server: TeacherServer | None = None
        self._schema_lock = threading.Lock()
        self._position = 0  # reader position of the next sample given to dump()/the service
        self._started = False
        self._closed = threading.Event()  # the one stop signal of every service
        self._services: set[int] = set()  # threads running start_knowledge_service
        self._idle = threading.Condition()  # notified when a service ends

    @property
    def token(self) -> str | None:
        """The token students need (given, from ``KDSERVE_TOKEN``, or generated at start)."""
        return self._security.token

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
        token = self._security.token_for(self.host, self.name)
        self._server = TeacherServer(
            name=self.name,
            host=self.host,
            port=self.out_port,
            token=token,
            schema=None,
            window=None,
            query=None,
            tls=self._security.tls,
            tls_client_ca=self._security.client_ca,
            chunk_bytes=self.chunk_bytes,
            model=self.model or None,
            provenance=self.provenance,
            **self.limits.server_options(),
        )
        if self.name == f"teacher:{self.out_port}":  # the default name: use the real port
            self.name = self._server.name = f"teacher:{self._server.port}"
        self.out_port = self._server.port  # the real port when 0 asked for any
        published = self._security.publish(self.out_port)
        note = f"; its token is in {published}" if published else ""
        _log.info("teacher %s serving on %s%s", self.name, self.address, note)

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
        if self._server is not None:
            if self._server.window is not None:
                self._server.window.stop()
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
        self._security.withdraw()
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
        if self._store is not None:
            self._store.finish()

    def __enter__(self) -> Teacher:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and self._store is not None:
            self._store.keep_incomplete(f"the `with` block raised {exc_type.__name__}")
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
                schema = schema.with_metadata(teacher=self.name)
                if self._store is not None:
                    self._store.open(schema)
                self.schema = schema
                if self._server is not None:
                    self._server.set_schema(schema.to_arrow())
            elif schema.with_metadata(teacher=self.name) != self.schema:
                raise SchemaError(
                    f"teacher {self.name!r} produces {self.schema.describe()}; a batch with "
                    f"{schema.describe()} does not fit"
                )

    @property
    def rows_stored(self) -> int:
        """Rows in the store so far (including those found when resuming)."""
        return self._store.rows if self._store is not None else 0

    # -- offline: dump --------------------------------------------------------------

    def dump(self, knowledge: Mapping[str, Any]) -> None:
        """Write one batch of knowledge to the store (Pantheon's offline ``dump``).

        The first batch fixes the schema (inferred from its arrays). Sample ids come from
        ``knowledge["sample_id"]`` or count on from the previous batch. On a resumed
        store, rows it already holds are skipped.
        """
        self._check_started()
        if self._store is None:
            raise KdserveError(f"teacher {self.name!r} has no out_path; dump() writes a store")
        self._store.begin(service=False)  # after a failed service: from where it began
        data = dict(knowledge)
        n = batch_length(data)  # every field is checked against it when the batch is built
        ids = np.asarray(data.pop(SAMPLE_ID)) if SAMPLE_ID in data else None
        if ids is None:
            ids = np.arange(self._position, self._position + n, dtype=np.int64)
        self._publish_schema(self.schema or Schema.from_arrays(data))
        assert self.schema is not None
        batch = to_record_batch(data, self.schema, ids)
        self._position += n
        rows = self._store.wants(0, 0, ids)
        if rows is not None:
            self._store.put(0, 0, batch, rows)

    # -- the service ----------------------------------------------------------------

    def start_knowledge_service(
        self,
        feed_list: Sequence[str],
        schema: Keep | None,
        program: Program,
        reader_config: Any,
        exe: Any = None,
        buf_size: int = 10,
        use_fp16: bool = False,
        times: int = 1,
        num_postprocess_threads: int = 2,
        num_inference_threads: int | None = None,
    ) -> int:
        """Run ``program`` over the reader; store and/or serve the knowledge.

        ``schema`` names the fields to keep -- program outputs, or feeds passed through --
        or maps each knowledge name to the output or feed it is taken from (Pantheon's
        ``{"name": variable}``), or is a :class:`Schema` that declares them (with codecs);
        None keeps every program output.
        ``exe`` is accepted for Pantheon's call shape and unused (the program runs
        itself). ``use_fp16`` stores float fields as float16. Online, ``times`` passes
        are served (each student call of its generator takes the next) and this returns
        when every student has received the last one; a store is written in the first
        pass. Online with ``reader_config=None``, the teacher only answers queries, until
        :meth:`close`. Returns the samples this call delivered (written to the store, or
        served over all passes). Offline, the store is complete and durable when this
        returns; if it raises, the store is left incomplete and a re-run resumes it -- in
        a new process, or on this teacher: the next service starts again at the failed
        one's first sample id, skipping the samples stored already.

        ``num_postprocess_threads`` encode batches (codecs, Arrow) in parallel. With
        ``num_inference_threads`` > 1 that many program calls run at once (order is kept):
        use it with a program that is safe to call concurrently, such as
        :func:`kdserve.torch.teacher_program` with one replica per device. The default
        (None) is the program's ``concurrency`` attribute if it has one (a
        ``teacher_program`` on a GPU: 2 streams per device), else 1. Each call runs on a
        thread of its own (a lane, kept for the whole service) with the next one queued
        behind it, so the program never waits for kdserve between batches; a program with
        a ``submit(feed)`` method returning a ``concurrent.futures.Future`` of its outputs
        (a ``teacher_program``) gets its calls submitted to its own threads instead.
        (Without a declared :class:`Schema`, the first batch runs alone, to learn the
        schema.)
        """
        self._check_started()
        server = self._server
        check_program(program, times)
        if times != 1 and server is None:
            raise ValueError(
                f"times={times}: a store is written once and students read it as often as "
                f"they like; times > 1 is for online service (out_port=)"
            )
        if num_inference_threads is None:
            num_inference_threads = program_concurrency(program)
        if min(buf_size, num_postprocess_threads, num_inference_threads) < 1:
            raise ValueError(
                "buf_size, num_postprocess_threads and num_inference_threads must be >= 1"
            )
        if reader_config is None and server is None:
            raise ValueError("reader_config=None (queries only) needs out_port=")
        names = None if schema is None else knowledge_names(schema)[0]
        if isinstance(schema, Schema):
            self._publish_schema(schema)
        elif self._store is not None and self._store.resume_rows and self.schema is None:
            # Resuming: check this run against the store now, even if it skips every sample.
            self._publish_schema(self._store.stored_schema(names, use_fp16))
        keep = schema if schema is not None or self.schema is None else self.schema.names
        encoder = Encoder(
            program, keep, use_fp16, feed_list, lambda: self.schema, self._publish_schema
        )
        sinks: list[Sink] = [self._store] if self._store is not None else []
        if server is not None and reader_config is not None:
            # The window first: a student must never see this teacher as query-only.
            window = ReplayWindow(times, buf_size, self.window_bytes)
            server.attach(window)
            sinks.append(ServeSink(window, self.student_grace))
        if server is not None:
            server.answer_queries(encoder.query)
        if reader_config is None:
            self._closed.wait()
            return encoder.samples
        pipeline = Pipeline(
            reader_config,
            feed_list,
            encoder,
            sinks,
            stop=self._closed,
            times=times,
            base=self._position,
            buf_size=buf_size,
            threads=num_postprocess_threads,
            calls=num_inference_threads,
            label=f"teacher {self.name}",
            progress=self.progress,
        )
        with self._idle:
            self._services.add(threading.get_ident())
        ended = False
        try:
            if self._store is not None:
                self._store.begin(service=True)
            delivered = pipeline.run()
            ended = True
            if self._closed.is_set() and self._store is not None:
                self._store.keep_incomplete("close() stopped its dump")
                _log.warning("teacher %s: close() stopped its knowledge service", self.name)
            return delivered
        finally:
            if ended:  # the next service's ids count on; after a failure, a retry covers
                self._position = pipeline.position  # the same samples again
            with self._idle:
                self._services.discard(threading.get_ident())
                self._idle.notify_all()
            # Durable now, and complete unless it failed or close() stopped it: Pantheon
            # code calls no close().
            if self._store is not None:
                self._store.finish()

    # -- messages -------------------------------------------------------------------

    def send(self, message: Any) -> None:
        """Send a message (JSON values and numpy arrays) to every student (online)."""
        self._online("send").broadcast(message)

    def recv(self, timeout: float | None = None) -> Any:
        """The next message from a student; waits up to ``timeout`` seconds (None: forever,
        interruptible). Raises TimeoutError when none came."""
        server = self._online("recv")
        for step in slices(timeout, POLL):
            try:
                return server.inbox.get(timeout=step)[1]
            except queue.Empty:
                pass
            if self._closed.is_set():
                break
        raise TimeoutError(f"no message reached teacher {self.name!r} within {timeout} s")

    def _online(self, what: str) -> TeacherServer:
        self._check_started()
        if self._server is None:
            raise KdserveError(f"{what}() needs an online teacher (out_port=)")
        return self._server


def checked_provenance(values: Mapping[str, Any]) -> dict[str, Any]:
    """``provenance`` checked: at most 64 names (of 1 to 256 characters) to plain values
    (str of at most 1024 characters, int, finite float, bool) -- what an online teacher's
    info can carry."""
    bad = {
        k: v
        for k, v in values.items()
        if not isinstance(k, str)
        or not 0 < len(k) <= MAX_PROVENANCE_NAME
        or not (
            isinstance(v, (bool, int))
            or (isinstance(v, float) and math.isfinite(v))
            or (isinstance(v, str) and len(v) <= MAX_TEXT_CHARS)
        )
    }
    if bad:
        raise KdserveError(
            f"provenance maps names (1 to {MAX_PROVENANCE_NAME} characters) to str (at most "
            f"{MAX_TEXT_CHARS} characters), int, finite float or bool values; got {bad!r}"
        )
    size = len(json.dumps(dict(values)))
    if len(values) > MAX_PROVENANCE_ITEMS or size > MAX_PROVENANCE_BYTES:
        raise KdserveError(
            f"provenance holds {len(values)} names in {size} bytes of JSON; at most "
            f"{MAX_PROVENANCE_ITEMS} names in {MAX_PROVENANCE_BYTES} bytes: record facts "
            f"(a tokenizer's hash, not its vocabulary)"
        )
    return dict(values)
