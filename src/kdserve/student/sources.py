"""Sources: a student's registered teachers behind one interface -- a store read from
disk, or a served teacher read over the network. Each source owns its reader or its
connection, checks the provenance its teacher records against the student's ``expect``,
and reads its batches into knowledge (through its :class:`VocabMap`, if it has one); a
new kind of teacher is one more Source class."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from kdserve.core.align import rows_of
from kdserve.core.batch import Knowledge, from_record_batch, sample_ids
from kdserve.core.idset import IdSet, repeats
from kdserve.core.sampler import Block, Sampler
from kdserve.core.schema import Schema
from kdserve.errors import AlignmentError, KdserveError, MergeError, ProtocolError, StoreError
from kdserve.online.client import TeacherClient
from kdserve.online.protocol import TeacherInfo
from kdserve.store import StoreReader
from kdserve.student.messaging import query_batches
from kdserve.student.vocab_map import VocabMap

__all__ = [
    "Source",
    "StoreSource",
    "StreamSource",
    "TeacherSource",
    "describe_teacher",
    "refuse_mixed_vocabularies",
]


_VOCABULARY = ("vocab_size", "tokenizer")  # what says what token ids mean


class Source(ABC):
    """A registered teacher: its name, schema, provenance and (for served teachers)
    connection. ``expect`` is the provenance the student requires of it; ``vocab_map``
    (None: it speaks the student's vocabulary) rewrites its top-k indices."""

    def __init__(
        self,
        name: str,
        expect: Mapping[str, Any] | None = None,
        vocab_map: VocabMap | None = None,
    ) -> None:
        if vocab_map is not None and not isinstance(vocab_map, VocabMap):
            raise TypeError(
                f"vocab_map must be a kd.VocabMap(ids, vocab_size), got {type(vocab_map).__name__}"
            )
        self.name = name
        self.expect = dict(expect or {})
        self.vocab_map = vocab_map

    @abstractmethod
    def open(self) -> None:
        """Called by ``Student.start()``: fail now (missing store, unreachable teacher,
        wrong token), not mid-pass."""

    @property
    @abstractmethod
    def schema(self) -> Schema:
        """The knowledge it gives, as the teacher records it."""

    @property
    @abstractmethod
    def provenance(self) -> dict[str, Any]:
        """What its teacher recorded (``Teacher(provenance=...)``); {} if nothing."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What it is and what it records: where, name, model, kdserve version,
        provenance, and its fields as the teacher gives them (codecs included)."""

    @property
    def comparable(self) -> dict[str, Any]:
        """Its provenance as the student receives its knowledge (see :meth:`received`)."""
        return self.received(self.provenance)

    def received(self, provenance: Mapping[str, Any]) -> dict[str, Any]:
        """``provenance`` as the student receives the knowledge: with a vocab_map, in the
        student's vocabulary (``vocab_size`` the map's, no ``tokenizer``)."""
        if self.vocab_map is None:
            return dict(provenance)
        others = {k: v for k, v in provenance.items() if k not in _VOCABULARY}
        return others | {"vocab_size": self.vocab_map.vocab_size}

    @functools.cached_property
    def knowledge_schema(self) -> Schema:
        """The knowledge it gives as the student receives it (TopK fields over the
        student's vocabulary, with a vocab_map)."""
        if self.vocab_map is None:
            return self.schema
        return self.vocab_map.schema(self.schema, self.name)

    def knowledge(
        self, batch: pa.RecordBatch, decode: bool, schema: Schema | None = None
    ) -> Knowledge:
        """One of its batches -- of its :attr:`schema`, or of ``schema`` (a query's
        answer) -- as arrays, through its vocab_map if it has one."""
        schema = self.schema if schema is None else schema
        if self.vocab_map is None:
            return from_record_batch(batch, schema, decode=decode)
        return self.vocab_map.knowledge(batch, schema, decode, self.name)

    def check_expect(self, recorded: Mapping[str, Any]) -> None:
        """Refuse the teacher unless its provenance (``recorded``, as :meth:`received`
        gives it) holds every value the student expects."""
        wrong = {k: recorded.get(k) for k, v in self.expect.items() if recorded.get(k) != v}
        if wrong:
            expected = {k: self.expect[k] for k in wrong}
            mapped = ""
            if self.vocab_map is not None and set(wrong) & set(_VOCABULARY):
                mapped = " (with its vocab_map: vocab_size the map's, tokenizer not compared)"
            raise self._unexpected(f"{wrong}{mapped} where the student expects {expected}")

    @abstractmethod
    def _unexpected(self, what: str) -> KdserveError:
        """The error for a teacher whose provenance is not what the student expects."""

    @property
    def streams(self) -> bool:
        """Whether it gives knowledge passes (a query-only teacher does not)."""
        return True

    def client(self) -> TeacherClient:
        """Its connection, for messages and queries."""
        raise KdserveError(f"teacher {self.name!r} is offline (a store): no messages")

    def close(self) -> None:  # noqa: B027 -- optional hook
        """Release what it holds."""


class StoreSource(Source):
    """A knowledge store, and how its rows map onto the reference store's order."""

    def __init__(
        self,
        name: str,
        path: str,
        allow_incomplete: bool,
        verify: bool,
        expect: Mapping[str, Any] | None = None,
        vocab_map: VocabMap | None = None,
    ) -> None:
        super().__init__(name, expect, vocab_map)
        self.path = path
        self.allow_incomplete = allow_incomplete
        self.verify = verify
        self.rows_of: np.ndarray | None = None  # reference row -> this store's row; None: same
        self._order: np.ndarray | None = None  # argsort of the ids, made on first lookup

    def open(self) -> None:
        self.reader = StoreReader(self.path, verify=self.verify)
        if not self.reader.complete and not self.allow_incomplete:
            raise StoreError(
                f"store {self.path} (teacher {self.name!r}) is incomplete: its dump is still "
                f"running or was interrupted ({len(self.reader)} samples in complete shards). "
                f"Re-run the dump to finish it, or register it with allow_incomplete=True",
                path=self.path,
            )
        self.check_expect(self.comparable)
        self.ids = self.reader.sample_ids()
        refuse_repeats(self.ids, f"store {self.path} (teacher {self.name!r})", self.name)

    def _unexpected(self, what: str) -> KdserveError:
        return StoreError(
            f"store {self.path} (teacher {self.name!r}) records provenance {what}: it holds "
            f"another teacher's knowledge (None: not recorded; dump with provenance=...), or "
            f"drop those names from expect=",
            path=self.path,
            teacher=self.name,
        )

    @property
    def schema(self) -> Schema:
        return self.reader.schema

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.reader.teacher.get("provenance") or {})

    def describe(self) -> dict[str, Any]:
        recorded = self.reader.teacher
        return describe_teacher(
            {"store": self.path},
            recorded.get("name"),
            recorded.get("model"),
            recorded.get("kdserve_version"),
            self.provenance,
            self.schema,
            self.vocab_map,
        )

    def __len__(self) -> int:
        return len(self.reader)

    def align_to(self, reference: StoreSource) -> None:
        """Map the reference store's rows onto this store's rows, by sample id: both hold
        the same samples (or the reference, read incomplete, some of them)."""
        if np.array_equal(reference.ids, self.ids):
            return
        self.rows_of = self.rows_for(reference.ids, reference.name)
        if len(self.ids) != len(reference.ids) and reference.reader.complete:
            raise self._not_the_same(reference.ids, reference.name)  # samples only here

    def rows_for(self, ids: np.ndarray, reference: str) -> np.ndarray:
        """This store's rows holding ``ids`` (which may repeat: ranks evened by padding);
        AlignmentError naming the first missing id."""
        if self._order is None:
            self._order = np.argsort(self.ids, kind="stable")
        rows = rows_of(self.ids, ids, self._order)
        if rows is None:
            raise self._not_the_same(ids, reference)
        return rows

    def check_served(self, rows: int, reference: str, epoch: int) -> None:
        """AlignmentError if this store, complete, holds other samples than the ``rows``
        that ``reference`` served in pass ``epoch`` (looked up by id, they were never
        read)."""
        if self.reader.complete and len(self) != rows:
            raise self._unlike(
                reference,
                f"{reference!r} served {rows} in pass {epoch}, store {self.path} holds "
                f"{len(self)} (the others were never read)",
            )

    def _not_the_same(self, ids: np.ndarray, reference: str) -> AlignmentError:
        """The error for ``reference``'s ``ids`` that this store does not hold alike."""
        missing = np.setdiff1d(ids, self.ids)
        extra = np.setdiff1d(self.ids, ids)
        a = int(missing[0]) if len(missing) else None
        b = int(extra[0]) if len(extra) else None
        return self._unlike(
            reference,
            f"first id only in {reference!r}: {a}, first id only in {self.name!r}: {b} "
            f"({len(np.unique(ids))} vs {len(self.ids)} samples)",
            (a, b),
        )

    def _unlike(
        self, reference: str, how: str, ids: tuple[int | None, int | None] = (None, None)
    ) -> AlignmentError:
        return AlignmentError(
            f"teachers {reference!r} and {self.name!r} do not hold the same samples: {how}. "
            f"Produce both teachers' knowledge over the same data",
            teachers=(reference, self.name),
            sample_ids=ids,
        )

    def lookup(self, ids: np.ndarray, reference: str) -> pa.RecordBatch:
        """The rows holding ``ids``, in that order (to match another teacher's batch)."""
        return self.reader.take(self.rows_for(ids, reference))

    def batches(self, blocks: list[Block]) -> Iterator[pa.RecordBatch]:
        """The rows of ``blocks`` (numbered as the reference store's rows), in order."""
        if self.rows_of is not None:
            rows_of = self.rows_of
            blocks = [
                Block(
                    b.start,
                    b.stop,
                    rows_of[np.arange(b.start, b.stop) if b.rows is None else b.rows],
                )
                for b in blocks
            ]
        return self.reader.iter_blocks(blocks)


class StreamSource(Source):
    """A teacher that streams its passes to the student: a served teacher, or a teacher
    pool (:mod:`kdserve.ray`). Its passes drive the student's; stores follow them."""

    @abstractmethod
    def check_pass(self, epoch: int) -> None:
        """KdserveError unless it serves pass ``epoch``."""

    @abstractmethod
    def share(self, epoch: int, sampler: Sampler) -> Iterator[pa.RecordBatch]:
        """This rank's batches of pass ``epoch``, each sample once."""

    def cancel(self) -> None:
        """Stop its passes now, from any thread (a read waiting on it returns)."""

    @abstractmethod
    def query(
        self, batches: Iterable[Mapping[str, Any]], max_in_flight: int, decode: bool
    ) -> Iterator[Knowledge]:
        """Query mode: the knowledge for each batch of inputs, in order."""

    def _evened(
        self,
        batches: Iterator[pa.RecordBatch],
        sampler: Sampler,
        shares: Callable[[], list[int]],
    ) -> Iterator[pa.RecordBatch]:
        """``batches`` (this rank's share of a pass), evened with the other ranks' once the
        pass is over: ``shares()`` is every rank's rows. ``even="pad"`` repeats this rank's
        first rows up to the largest share, ``"drop"`` cuts its last batch to the smallest
        (so data-parallel ranks step together: a collective never waits for a rank that
        has finished)."""
        even = sampler.even if sampler.world_size > 1 else "none"
        rows = 0
        first: pa.RecordBatch | None = None  # padding repeats this rank's first rows
        held: pa.RecordBatch | None = None  # dropping may cut the last batch
        for batch in batches:
            rows += batch.num_rows
            first = batch if first is None else first
            ready: pa.RecordBatch | None = batch
            if even == "drop":  # one batch behind: the last one may have to be cut
                ready, held = held, batch
            if ready is not None:
                yield ready
        if even == "none":
            return
        told = shares()
        if even == "pad":
            missing = max(told) - rows
            if first is None and missing > 0:
                raise KdserveError(
                    f"rank {sampler.rank} got no sample of teacher {self.name!r} to pad its "
                    f"share with: the teacher's batches are dealt whole to the "
                    f"{sampler.world_size} ranks (times loader workers), and this pass had "
                    f"fewer. Serve smaller batches (the teacher's batch size), or read with "
                    f"fewer ranks or workers"
                )
            while missing > 0 and first is not None:
                piece = first.slice(0, missing)
                yield piece
                missing -= piece.num_rows
        elif held is not None:
            keep = held.num_rows - (rows - min(told))
            if keep < 0:
                raise KdserveError(
                    f"teacher {self.name!r}'s batches differ too much in size for "
                    f"even_ranks='drop' (rank {sampler.rank} has {rows} rows, the smallest "
                    f"share is {min(told)}); use even_ranks='pad', or give the ranks equal "
                    f"shares (batches of one size; a pool's parts of one size, as many each)"
                )
            if keep:
                yield held.slice(0, keep)

    def _refuse_repeated(self, ids: np.ndarray, seen: IdSet, epoch: int) -> None:
        """AlignmentError for a batch that repeats ids (within itself or the pass so far)."""
        refuse_repeats(ids, f"a batch of teacher {self.name!r}", self.name)
        again = ids[seen.contains(ids)]
        raise AlignmentError(
            f"teacher {self.name!r} sent sample id(s) {again[:5].tolist()} twice in "
            f"pass {epoch}: each sample must appear once per pass; fix the teacher's reader "
            f"or its sample_id feed",
            teachers=(self.name, self.name),
            sample_ids=(int(again[0]), int(again[0])),
        )


class TeacherSource(StreamSource):
    """A served teacher: its connection, and (asked for on first use, so that messages
    flow before its knowledge service starts) its schema and what it serves."""

    def __init__(
        self,
        name: str,
        client: TeacherClient,
        expect: Mapping[str, Any] | None = None,
        vocab_map: VocabMap | None = None,
    ) -> None:
        super().__init__(name, expect, vocab_map)
        self._client = client

    def open(self) -> None:
        self._client.ping()  # reachable, and the token fits

    @functools.cached_property
    def info(self) -> TeacherInfo:
        """What the teacher serves -- whether it streams, its passes (times), its buf_size
        -- and its provenance, checked against the student's ``expect`` (its knowledge
        service must run: it is asked when its knowledge is first needed)."""
        info = self._client.teacher_info()
        self.check_expect(self.received(info.provenance))
        return info

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.info.provenance)

    def _check_same_teacher(self) -> None:
        """Before a broken stream resumes: KdserveError unless the teacher answering now
        is the one the pass began with (restarted), not another started on its address,
        whose knowledge would be mixed into the pass."""
        now, before = self._client.teacher_info(), self.info
        changed = [
            f"{key} {getattr(before, key)!r} -> {getattr(now, key)!r}"
            for key in ("name", "model", "provenance")
            if getattr(now, key) != getattr(before, key)
        ]
        if not changed and now.stream and self._client.schema() != self.schema:
            changed.append("its knowledge fields")
        if changed:
            raise KdserveError(
                f"the teacher at {self._client.address} that student teacher {self.name!r} "
                f"was reading stopped, and another answers there now ({'; '.join(changed)}): "
                f"its knowledge would be mixed into the pass. Restart the same teacher "
                f"there, or register the new one as a teacher of its own",
                teacher=self.name,
            )

    def _unexpected(self, what: str) -> KdserveError:
        return KdserveError(
            f"online teacher {self.name!r} at {self._client.address} reports provenance "
            f"{what}: it serves another teacher's knowledge (None: not reported; serve it "
            f"with provenance=...), or drop those names from expect=",
            teacher=self.name,
        )

    def describe(self) -> dict[str, Any]:
        info = self.info
        return describe_teacher(
            {"address": self._client.address},
            info.name,
            info.model,
            info.kdserve_version,
            self.provenance,
            self.schema,
            self.vocab_map,
        )

    def query(
        self, batches: Iterable[Mapping[str, Any]], max_in_flight: int, decode: bool
    ) -> Iterator[Knowledge]:
        """Query mode: the knowledge for each batch of inputs (its provenance checked
        first if the student expects some), through its vocab_map if it has one."""
        if self.expect:
            self.info  # noqa: B018 -- asked (and checked) once, before the first query
        yield from query_batches(
            self._client,
            batches,
            max_in_flight,
            lambda answer: self.knowledge(answer, decode, Schema.from_arrow(answer.schema)),
        )

    @functools.cached_property
    def schema(self) -> Schema:
        return self._client.schema() if self.info.stream else Schema([])

    @property
    def streams(self) -> bool:
        return self.info.stream

    def client(self) -> TeacherClient:
        return self._client

    def close(self) -> None:
        self._client.close()

    def cancel(self) -> None:
        self._client.cancel_streams()

    def check_pass(self, epoch: int) -> None:
        """KdserveError unless the teacher serves pass ``epoch`` (it serves ``times``)."""
        if epoch >= self.info.times:
            raise KdserveError(
                f"teacher {self.name!r} serves {self.info.times} pass(es) (its times=); "
                f"this would be pass {epoch + 1}"
            )

    def share(self, epoch: int, sampler: Sampler) -> Iterator[pa.RecordBatch]:
        """This rank's batches of pass ``epoch``: repeated sample ids refused; with several
        ranks, evened to the others' shares (``sampler.even``) once the pass is over, since
        the teacher deals whole batches to ranks in turn."""
        rank, world = sampler.rank, sampler.world_size
        ack_every = max(1, self.info.buf_size // 2)
        seen = IdSet()
        told: list[int] = []  # every rank's rows, told at the end of the pass

        def batches() -> Iterator[pa.RecordBatch]:
            stream = self._client.stream_pass(
                epoch, rank, world, ack_every, told, self._check_same_teacher
            )
            for batch in stream:
                ids = sample_ids(batch)
                if not seen.add_new(ids):
                    self._refuse_repeated(ids, seen, epoch)
                yield batch

        def shares() -> list[int]:
            if len(told) != world:
                raise ProtocolError(
                    f"online teacher {self.name!r} ended pass {epoch} without telling the "
                    f"ranks' shares (got {told}); is it an older kdserve? Use even_ranks='none'"
                )
            return told

        return self._evened(batches(), sampler, shares)


def refuse_repeats(ids: np.ndarray, where: str, teacher: str) -> None:
    """AlignmentError naming the first ids that ``where`` holds more than once."""
    repeated = repeats(ids)
    if len(repeated):
        raise AlignmentError(
            f"{where} holds sample id(s) {repeated[:5].tolist()} more than once "
            f"({len(repeated)} repeated id(s)): each sample must appear once per pass; fix "
            f"the teacher's reader or its sample_id feed",
            teachers=(teacher, teacher),
            sample_ids=(int(repeated[0]), int(repeated[0])),
        )


def refuse_mixed_vocabularies(sources: Sequence[Source]) -> None:
    """MergeError if two teachers (stores or online) record a different ``vocab_size`` or
    ``tokenizer``: their token positions and indices mean different things. A teacher
    with a vocab_map counts with the map's ``vocab_size`` (and no tokenizer)."""
    for key in _VOCABULARY:
        seen = {s.name: s.comparable[key] for s in sources if key in s.comparable}
        if len(set(map(str, seen.values()))) > 1:
            raise MergeError(
                f"teachers record different {key}s {seen}: their knowledge does not line up "
                f"token by token; distil from teachers that share a tokenizer, or register "
                f"the others with vocab_map=kd.VocabMap(ids, vocab_size) (their token ids in "
                f"the student's)"
            )


def describe_teacher(
    where: dict[str, Any],
    name: str | None,
    model: str | None,
    version: str | None,
    provenance: dict[str, Any],
    schema: Schema,
    vocab_map: VocabMap | None,
) -> dict[str, Any]:
    """One teacher's entry of ``Student.get_teacher_desc()``."""
    desc = where | {"name": name, "model": model, "kdserve_version": version}
    desc |= {"provenance": provenance, "fields": schema.describe()}
    if vocab_map is not None:
        desc["vocab_map"] = {"teacher_vocab": len(vocab_map), "vocab_size": vocab_map.vocab_size}
    return desc
