"""Teacher: runs a model over a data reader and writes the knowledge to a store.

Pantheon's calls keep their names and meaning::

    teacher = Teacher(out_path="knowledge/")
    teacher.start()
    teacher.start_knowledge_service(
        feed_list=["image"], schema=["logits"], program=model_fn,
        reader_config={"sample_generator": gen, "batch_size": 64}, use_fp16=True)
    teacher.close()

``program`` is any callable from a dict of feed arrays to a dict of output arrays.
Reading and inference run on a background thread, encoding (codecs, Arrow) on a small
thread pool, writing on the calling thread; all three overlap, bounded by ``buf_size``
batches. A store that already holds rows is resumed: the teacher skips that many
samples of its reader (sample ids are reader positions unless the reader provides
``sample_id``), so re-running an interrupted dump completes it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from kdserve.batch import to_record_batch
from kdserve.codecs import Fp16
from kdserve.errors import KdserveError, SchemaError, StoreError
from kdserve.prefetch import Prefetcher
from kdserve.reader import FeedBatch, iter_feed_batches
from kdserve.schema import SAMPLE_ID, Schema
from kdserve.store import DEFAULT_SHARD_BYTES, StoreReader, StoreWriter, stored_rows

__all__ = ["Teacher"]

Program = Callable[[dict[str, Any]], Mapping[str, Any]]


class Teacher:
    """Produces knowledge into a store at ``out_path`` (online serving: see the issues).

    ``name`` and ``model`` (a free-form description, e.g. "resnet50, ImageNet top-1 76%")
    are recorded in the store's manifest. ``overwrite=True`` starts the store over;
    otherwise an existing store with the same schema is resumed. ``progress`` shows a
    samples/s bar (None: only on a terminal).
    """

    def __init__(
        self,
        out_path: str | os.PathLike[str],
        *,
        name: str | None = None,
        model: str | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
        progress: bool | None = None,
    ) -> None:
        self.out_path = os.fspath(out_path)
        self.name = name or os.path.basename(os.path.normpath(self.out_path)) or "teacher"
        self.model = model
        self.shard_bytes = shard_bytes
        self.overwrite = overwrite
        self.progress = progress
        self.schema: Schema | None = None
        self._writer: StoreWriter | None = None
        self._position = 0  # reader position of the next sample given to dump()/the service
        self._resume_rows = 0 if overwrite else stored_rows(self.out_path)
        self._started = False
        self._closed = False

    def start(self) -> None:
        """Pantheon's start(): ready the teacher. Safe to call more than once."""
        if self._closed:
            raise KdserveError(f"teacher {self.name!r} is closed; create a new Teacher")
        self._started = True

    def _open_writer(self, schema: Schema) -> StoreWriter:
        if self._writer is None:
            self.schema = schema.with_metadata(teacher=self.name)
            self._writer = StoreWriter(
                self.out_path,
                self.schema,
                shard_bytes=self.shard_bytes,
                overwrite=self.overwrite,
                teacher={"name": self.name, **({"model": self.model} if self.model else {})},
            )
            if self._resume_rows:
                print(
                    f"[kdserve] resuming store {self.out_path}: the {self._resume_rows} samples "
                    f"it holds are skipped",
                    file=sys.stderr,
                )
        elif schema.with_metadata(teacher=self.name) != self.schema:
            raise SchemaError(
                f"teacher {self.name!r} writes fields {self.schema and self.schema.describe()}; "
                f"a batch with {schema.describe()} does not fit"
            )
        return self._writer

    @property
    def rows_stored(self) -> int:
        """Rows in the store so far (including those found when resuming)."""
        return self._writer.rows if self._writer else 0

    def dump(self, knowledge: Mapping[str, Any]) -> None:
        """Write one batch of knowledge (Pantheon's offline ``dump``).

        The first batch fixes the schema (inferred from its arrays). Sample ids come from
        ``knowledge["sample_id"]`` or count on from the previous batch. On a resumed
        store, rows it already holds are skipped.
        """
        self._check_started()
        data = dict(knowledge)
        n = _batch_length(data)  # every field is checked against it when the batch is built
        ids = np.asarray(data.pop(SAMPLE_ID)) if SAMPLE_ID in data else None
        if ids is None:
            ids = np.arange(self._position, self._position + n, dtype=np.int64)
        writer = self._open_writer(self.schema or Schema.from_arrays(data))
        assert self.schema is not None
        batch = to_record_batch(data, self.schema, ids)
        skip = self._skip(n)
        if skip < n:
            writer.write(batch.slice(skip))

    def start_knowledge_service(
        self,
        feed_list: Sequence[str],
        schema: Sequence[str] | Schema,
        program: Program,
        reader_config: Any,
        buf_size: int = 10,
        use_fp16: bool = False,
        times: int = 1,
        num_postprocess_threads: int = 2,
    ) -> int:
        """Run ``program`` over the reader and store the knowledge; return rows written.

        ``schema`` names the fields to keep -- program outputs, or feeds passed through --
        or is a :class:`Schema` that declares them (with codecs). ``use_fp16`` stores float
        fields as float16. A store is written once and read any number of times, so
        ``times`` (Pantheon's repeat count for online service) must be 1 here.
        """
        self._check_started()
        if times != 1:
            raise ValueError(
                f"times={times}: a store is written once and students read it as often as "
                f"they like; times > 1 is for online service"
            )
        if buf_size < 1 or num_postprocess_threads < 1:
            raise ValueError("buf_size and num_postprocess_threads must be >= 1")
        names = schema.names if isinstance(schema, Schema) else list(schema)
        if not names:
            raise SchemaError("schema must name at least one field to keep")
        declared = schema if isinstance(schema, Schema) else None
        if self._writer is None and self._resume_rows:
            # Resuming: check this run against the store now, even if it skips every sample.
            self._open_writer(declared or self._stored_schema(names, use_fp16))
        before = self.rows_stored
        feeds = self._unstored(iter_feed_batches(reader_config, feed_list))
        with (
            ThreadPoolExecutor(
                num_postprocess_threads, thread_name_prefix="kdserve-encode"
            ) as pool,
            tqdm(
                desc=f"teacher {self.name}",
                unit=" samples",
                disable=self.progress is False
                or (self.progress is None and not sys.stderr.isatty()),
            ) as bar,
        ):
            futures: Prefetcher[Future[pa.RecordBatch]] = Prefetcher(
                lambda: self._infer(feeds, program, names, declared, use_fp16, pool),
                buf_size,
                name="kdserve-infer",
            )
            for future in futures:
                batch = future.result()
                assert self._writer is not None
                self._writer.write(batch)
                bar.update(batch.num_rows)
        return self.rows_stored - before

    def _infer(
        self,
        feeds: Iterator[tuple[np.ndarray, FeedBatch]],
        program: Program,
        names: list[str],
        declared: Schema | None,
        use_fp16: bool,
        pool: ThreadPoolExecutor,
    ) -> Iterator[Future[pa.RecordBatch]]:
        for ids, feed in feeds:
            outputs = program(feed)
            if not isinstance(outputs, Mapping):
                raise SchemaError(
                    f"program must return a dict of output arrays, got {type(outputs).__name__}"
                )
            knowledge = {}
            for n in names:
                if n in outputs:
                    knowledge[n] = _to_numpy(outputs[n])
                elif n in feed:
                    knowledge[n] = feed[n]
                else:
                    raise SchemaError(
                        f"schema field {n!r} is neither a program output {sorted(outputs)} "
                        f"nor a feed {sorted(feed)}",
                        field=n,
                    )
            if self._writer is None:
                schema = declared or _infer_schema(knowledge, use_fp16)
                self._open_writer(schema)
            assert self.schema is not None
            yield pool.submit(to_record_batch, knowledge, self.schema, ids)

    def close(self) -> None:
        """Complete the store. What was dumped is readable afterwards. Idempotent."""
        if self._writer is not None:
            self._writer.close()
        self._closed = True

    def __enter__(self) -> Teacher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stored_schema(self, names: list[str], use_fp16: bool) -> Schema:
        """The schema of the store being resumed, if it is what ``names``/``use_fp16`` ask for."""
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

    def _skip(self, n: int) -> int:
        """Advance the reader position by a batch of ``n``; return how many of it are stored."""
        skip = min(max(self._resume_rows - self._position, 0), n)
        self._position += n
        return skip

    def _unstored(self, feeds: Iterator[FeedBatch]) -> Iterator[tuple[np.ndarray, FeedBatch]]:
        """Attach sample ids (reader positions, or the feed ``sample_id``); skip stored rows."""
        for feed in feeds:
            n = _batch_length(feed)
            position = self._position
            given = feed.get(SAMPLE_ID)
            ids = np.arange(position, position + n) if given is None else np.asarray(given)
            skip = self._skip(n)
            if skip < n:
                yield ids[skip:], {k: v[skip:] for k, v in feed.items()} if skip else feed

    def _check_started(self) -> None:
        if self._closed:
            raise KdserveError(f"teacher {self.name!r} is closed; create a new Teacher")
        if not self._started:
            raise KdserveError(f"call start() on teacher {self.name!r} first (or use `with`)")


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
