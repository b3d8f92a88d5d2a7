"""Encoder: a program's outputs for one feed batch -> one Arrow knowledge batch.

It picks the knowledge fields a service keeps (program outputs or feeds passed through),
learns the schema from the first batch unless one was declared, and answers queries.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, cast

import numpy as np
import pyarrow as pa

from kdserve.core.batch import from_record_batch, to_record_batch
from kdserve.core.ragged import Ragged
from kdserve.core.schema import SAMPLE_ID, Schema
from kdserve.errors import SchemaError
from kdserve.teacher.feeds import FeedBatch

__all__ = [
    "Encoder",
    "Keep",
    "Program",
    "batch_length",
    "check_program",
    "knowledge_names",
    "program_concurrency",
    "program_submit",
]

_log = logging.getLogger(__name__)

Program = Callable[[dict[str, Any]], Mapping[str, Any]]
Keep = Sequence[str] | Mapping[str, Any] | Schema
"""The knowledge fields to keep: names, ``{name: output or feed}``, or a declared Schema."""


def check_program(program: Any, times: Any) -> None:
    """TypeError/ValueError unless ``program`` can be called and ``times`` (passes) is an
    int >= 1: checked before any thread runs the service."""
    if not callable(program):
        raise TypeError(
            f"program must be callable (a dict of feed arrays -> a dict of outputs), got "
            f"{type(program).__name__}"
        )
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        raise ValueError(f"times must be an int >= 1 (passes to serve), got {times!r}")


def program_submit(program: Program) -> Callable[[FeedBatch], Future[Any]] | None:
    """The program's ``submit`` if it has one (a ``teacher_program``): it queues a call
    on the program's own threads and returns the Future of its outputs at once. None: a
    plain callable, which kdserve runs on threads of its own."""
    submit = getattr(program, "submit", None)
    if submit is None:
        return None
    if not callable(submit):
        raise TypeError(
            f"the program's submit attribute must be a method submit(feed) -> "
            f"concurrent.futures.Future (of what program(feed) returns), got {submit!r}"
        )
    return cast(Callable[[FeedBatch], "Future[Any]"], submit)


def program_concurrency(program: Program) -> int:
    """How many calls of ``program`` run at once by default: its ``concurrency``
    attribute (a ``teacher_program``'s lanes), else 1."""
    n = getattr(program, "concurrency", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TypeError(
            f"the program's concurrency attribute must be an int >= 1 (the calls it can run "
            f"at once), got {n!r}; or pass num_inference_threads= / inference_threads="
        )
    return n


class Encoder:
    """Turns program outputs into knowledge batches, for passes and for queries.

    ``keep`` names the knowledge fields (see :func:`knowledge_names`); None keeps every
    program output. ``schema()`` is the teacher's schema so far (None until the first
    batch fixes it); ``publish`` fixes it. ``feeds`` are the feeds a query must hold.
    """

    def __init__(
        self,
        program: Program,
        keep: Keep | None,
        use_fp16: bool,
        feeds: Sequence[str],
        current: Callable[[], Schema | None],
        publish: Callable[[Schema], None],
    ) -> None:
        self.program = program
        self.names, self.sources = ([], []) if keep is None else knowledge_names(keep)
        self.use_fp16 = use_fp16
        self.feeds = [f for f in feeds if f != SAMPLE_ID]
        self.schema = current
        self.publish = publish
        self.samples = 0  # samples inferred so far
        self._every_output = False  # keep=None: names are the first batch's outputs
        self._nan_seen: set[str] = set()  # fields warned about
        self._lock = threading.Lock()  # infer() and batch() run on several threads

    def infer(self, feed: FeedBatch) -> dict[str, Any]:
        """Run the program on one feed batch and pick the fields to keep."""
        return self.knowledge(feed, self.program(feed))

    def knowledge(self, feed: FeedBatch, outputs: Any) -> dict[str, Any]:
        """The fields to keep from the program's ``outputs`` for ``feed`` (and its feeds)."""
        if not isinstance(outputs, Mapping):
            raise SchemaError(
                f"program must return a dict of output arrays, got {type(outputs).__name__}"
            )
        ids, fed = outputs.get(SAMPLE_ID), feed.get(SAMPLE_ID)
        if ids is not None and (fed is None or not np.array_equal(_to_numpy(ids), fed)):
            raise SchemaError(
                f"the program returned an output named {SAMPLE_ID!r}, kdserve's own sample id "
                f"column (ids come from the reader's order or its {SAMPLE_ID!r} feed): "
                f"rename the output",
                field=SAMPLE_ID,
            )
        if not self.names:  # keep every output, in the program's order (first batch only)
            self.names, self.sources = knowledge_names(_outputs_to_keep(outputs))
            self._every_output = True
        elif self._every_output:
            new = [o for o in _outputs_to_keep(outputs) if o not in self.sources]
            if new:
                raise SchemaError(
                    f"the program returned output(s) {new} that its first batch did not "
                    f"({self.sources}): the first batch fixes what a teacher keeps. Return "
                    f"them from every batch, or name the fields to keep (keep=/schema=)",
                    field=new[0],
                )
        knowledge = {}
        for n, source in zip(self.names, self.sources, strict=True):
            if source in outputs:
                knowledge[n] = _knowledge_value(outputs, source)
            elif source in feed:
                knowledge[n] = feed[source]
            else:
                raise SchemaError(
                    f"schema field {n!r} is neither a program output {sorted(outputs)} "
                    f"nor a feed {sorted(feed)}",
                    field=n,
                )
        with self._lock:
            self.samples += batch_length(feed)
        return knowledge

    def first(self, feed: FeedBatch, outputs: Any) -> dict[str, Any]:
        """The first batch's knowledge from its ``outputs``, publishing the schema it
        sets (computed once)."""
        knowledge = self.knowledge(feed, outputs)
        self.publish(infer_schema(knowledge, self.use_fp16))
        return knowledge

    def batch(self, knowledge: dict[str, Any], ids: np.ndarray) -> pa.RecordBatch:
        """Encode one batch of knowledge with the teacher's schema (warning, once per
        field, of NaN in it: students would train on it)."""
        schema = self.schema()
        assert schema is not None
        for name, value in knowledge.items():
            if name not in self._nan_seen and _holds_nan(value):
                with self._lock:
                    first = name not in self._nan_seen
                    self._nan_seen.add(name)
                if not first:
                    continue
                _log.warning(
                    "knowledge field %r holds NaN (first in the batch of sample ids %s..%s); "
                    "students would train on it: check the teacher (e.g. a float16 "
                    "overflow). Warned once per field",
                    name,
                    int(ids.min()),
                    int(ids.max()),
                )
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
            self.publish(infer_schema(knowledge, self.use_fp16))
        return self.batch(knowledge, ids)


def knowledge_names(schema: Keep) -> tuple[list[str], list[str]]:
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


def batch_length(data: Mapping[str, Any]) -> int:
    """Samples in a batch of feeds or knowledge (its first field's length)."""
    if not data:
        raise SchemaError("an empty knowledge batch has no fields")
    return len(next(iter(data.values())))


def infer_schema(knowledge: Mapping[str, Any], use_fp16: bool) -> Schema:
    """The schema of a first batch of knowledge; ``use_fp16`` stores wide floats as fp16."""
    coded = [name for name, value in knowledge.items() if isinstance(value, Mapping)]
    if coded:
        raise SchemaError(
            f"output(s) {coded} come already coded (a dict of components, e.g. from "
            f"teacher_program(topk=)); declare them, e.g. keep=kd.Schema([kd.Field("
            f"{coded[0]!r}, 'float16', (None, vocab), codec=kd.TopK(k))])",
            field=coded[0],
        )
    schema = Schema.from_arrays(knowledge)
    if not use_fp16:
        return schema
    floats = [f.name for f in schema if f.dtype.kind == "f" and f.dtype.itemsize > 2]
    return schema.with_codecs(dict.fromkeys(floats, "fp16"))


def _holds_nan(value: Any) -> bool:
    """Whether a float array (a Ragged's values, a list of arrays) holds a NaN: one sum
    over it, and only if that is NaN (it is for a NaN, or +inf beside -inf) a look at
    the values."""
    if isinstance(value, (list, tuple)):  # sequences given as a list of arrays
        return any(_holds_nan(v) for v in value)
    array = value.values if isinstance(value, Ragged) else value
    if not isinstance(array, np.ndarray) or array.dtype.kind != "f" or not array.size:
        return False
    with np.errstate(all="ignore"):
        total = np.add.reduce(array, axis=None)
    return bool(np.isnan(total)) and bool(np.isnan(array).any())


def _outputs_to_keep(outputs: Mapping[str, Any]) -> list[str]:
    """Every output but the ``<name>_lengths``/``<name>_mask`` that describe another (and
    a ``sample_id`` passed through); SchemaError for a name that is no string."""
    for o in outputs:
        if not isinstance(o, str) or not o:
            raise SchemaError(f"program output names must be non-empty strings, got {o!r}")
    suffixes = ("_lengths", "_mask")
    return [
        o
        for o in outputs
        if o != SAMPLE_ID and not any(o.endswith(x) and o[: -len(x)] in outputs for x in suffixes)
    ]


def _knowledge_value(outputs: Mapping[str, Any], name: str) -> Any:
    """Output ``name`` as knowledge. Sequences may come the way language models give them:
    padded ``(batch, max_len, ...)`` with ``<name>_lengths`` (one length per row) or
    ``<name>_mask`` (``(batch, max_len)``, true at real positions; left or right padding)
    beside it, or as a :class:`Ragged` or a list of arrays. A dict is a field already coded
    (its codec's components, e.g. top-k from ``teacher_program(topk=)``)."""
    value = outputs[name]
    lengths, mask = outputs.get(f"{name}_lengths"), outputs.get(f"{name}_mask")
    if isinstance(value, Mapping):
        return {k: _unpad(_to_numpy(v), lengths, mask, name) for k, v in value.items()}
    return _unpad(_to_numpy(value), lengths, mask, name)


def _unpad(value: Any, lengths: Any, mask: Any, name: str) -> Any:
    """A padded array as the sequences its lengths or mask say (as is without either)."""
    if lengths is not None:
        return Ragged.from_padded(value, np.asarray(_to_numpy(lengths)))
    if mask is None:
        return value
    keep = np.asarray(_to_numpy(mask)).astype(bool)
    padded = np.asarray(value)
    if padded.ndim < 2 or keep.shape != padded.shape[:2]:
        raise SchemaError(
            f"output {name!r} has shape {padded.shape} but {name}_mask has shape {keep.shape}; "
            f"the mask must be (batch, max_len), true at the real positions",
            field=name,
        )
    return Ragged.from_lengths(padded[keep], keep.sum(axis=1))


def _to_numpy(value: Any) -> Any:
    """Program outputs may be framework tensors; numpy arrays, lists and Ragged pass through."""
    if isinstance(value, (np.ndarray, list, Ragged, Mapping)):
        return value
    if hasattr(value, "detach"):  # a torch tensor, possibly on a device
        value = value.detach()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16: float32
            value = value.float()
        value = value.cpu()
    return np.asarray(value)
