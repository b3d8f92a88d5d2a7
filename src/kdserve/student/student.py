"""Student: registers teachers, merges their knowledge by sample id, yields re-batched passes.

Pantheon's calls keep their names and meaning::

    student = Student(merge_strategy={"logits": "mean"})
    student.register_teacher(in_path="knowledge/teacher_a")      # offline: a store
    student.register_teacher(in_address="127.0.0.1:8470")       # online: a served teacher
    student.start()
    desc = student.get_knowledge_desc()
    reader = student.get_knowledge_generator(batch_size=32)
    for epoch in range(3):
        for batch in reader():       # each call is one more pass
            ...                      # dict[str, ndarray], incl. "sample_id"

Teachers are matched by sample id, never by arrival order. With online teachers, the
first online teacher's stream sets the order of a pass; other online teachers must
stream the same samples (each batch is realigned by id), and offline teachers are
looked up by id. With only offline teachers, the first one sets the order (block
shuffled with ``shuffle=True``), and the others are matched to it by id. Teachers that
do not hold the same samples are refused with an :class:`~kdserve.errors.AlignmentError`.
"""

from __future__ import annotations

import functools
import itertools
import os
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from kdserve.core.batch import Knowledge, from_record_batch, to_record_batch
from kdserve.core.idset import IdSet, repeats
from kdserve.core.merge import Merger, StrategySpec
from kdserve.core.prefetch import Prefetcher
from kdserve.core.rebatch import rebatch
from kdserve.core.sampler import Block, Even, Sampler
from kdserve.core.schema import SAMPLE_ID, Schema
from kdserve.errors import AlignmentError, KdserveError, ProtocolError, StoreError
from kdserve.online.client import TeacherClient
from kdserve.store import StoreReader

__all__ = ["Student"]


class _OfflineTeacher:
    """A registered store, and how its rows map onto the reference order."""

    def __init__(self, name: str, path: str, allow_incomplete: bool, verify: bool) -> None:
        self.name = name
        self.reader = StoreReader(path, verify=verify)
        self.schema = self.reader.schema
        if not self.reader.complete and not allow_incomplete:
            raise StoreError(
                f"store {path} (teacher {name!r}) is incomplete: its dump is still running or "
                f"was interrupted ({len(self.reader)} samples in complete shards). Re-run the "
                f"dump to finish it, or register_teacher(..., allow_incomplete=True)",
                path=path,
            )
        self.rows_of: np.ndarray | None = None  # reference row -> this store's row; None: same
        self._ids = self.reader.sample_ids()
        _refuse_repeats(self._ids, f"store {path} (teacher {name!r})", name)
        self._order: np.ndarray | None = None

    def align_to(self, reference: _OfflineTeacher) -> None:
        """Map the reference store's rows onto this store's rows, by sample id."""
        if np.array_equal(reference._ids, self._ids):
            return
        self.rows_of = self.rows_for(reference._ids, reference.name)

    def rows_for(self, ids: np.ndarray, reference: str) -> np.ndarray:
        """This store's rows holding ``ids``; AlignmentError naming the first missing id."""
        if self._order is None:
            self._order = np.argsort(self._ids, kind="stable")
        pos = np.searchsorted(self._ids, ids, sorter=self._order)
        rows = self._order[np.clip(pos, 0, max(len(self._ids) - 1, 0))] if len(self._ids) else pos
        found = len(self._ids) > 0 and np.array_equal(self._ids[rows], ids)
        if not found or (len(ids) != len(np.unique(ids))):
            missing = np.setdiff1d(ids, self._ids)
            extra = np.setdiff1d(self._ids, ids)
            a = int(missing[0]) if len(missing) else None
            b = int(extra[0]) if len(extra) else None
            raise AlignmentError(
                f"teachers {reference!r} and {self.name!r} do not hold the same samples: "
                f"first id only in {reference!r}: {a}, first id only in {self.name!r}: {b} "
                f"({len(ids)} vs {len(self._ids)} samples). Produce both teachers' knowledge "
                f"over the same data",
                teachers=(reference, self.name),
                sample_ids=(a, b),
            )
        return rows

    def batches(self, blocks: list[Block]) -> Iterator[pa.RecordBatch]:
        """The rows of ``blocks`` (numbered as the reference teacher's rows), in order."""
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


class _OnlineTeacher:
    """A registered served teacher: its connection, and (asked for on first use, so that
    messages flow before its knowledge service starts) its schema and what it serves."""

    def __init__(self, name: str, client: TeacherClient) -> None:
        self.name = name
        self.client = client

    @functools.cached_property
    def info(self) -> dict[str, Any]:
        return self.client.info()

    @functools.cached_property
    def schema(self) -> Schema:
        return self.client.schema() if self.info["stream"] else Schema([])


class Student:
    """Merges registered teachers' knowledge and yields it in the student's batch size.

    ``merge_strategy`` maps a field that several teachers produce to ``"sum"``,
    ``"mean"``, ``"max"``, ``"min"``, a :class:`~kdserve.core.merge.MergeStrategy` or a
    callable. ``shuffle``/``seed`` give each pass a deterministic block-shuffled order (a
    new one per pass; offline teachers only). ``rank``/``world_size`` (default:
    torchrun's RANK/WORLD_SIZE) give this process a disjoint share of every pass.
    ``even_ranks`` keeps data-parallel ranks in step: ``"pad"`` (the default, like torch's
    ``DistributedSampler``) repeats a few samples so that every rank reads as many as the
    largest share, ``"drop"`` leaves out the few samples past the smallest share, and
    ``"none"`` gives uneven shares (which deadlocks a DDP job whose ranks end a pass
    with different batch counts).
    ``token`` (or ``KDSERVE_TOKEN``), ``tls_root_certs``, ``tls_client_cert`` (the
    (cert, key) PEM pair a mutual-TLS teacher asks for) and ``connect_timeout`` apply
    to online teachers; ``buf_size`` batches are prefetched in the background.
    ``verify=True`` checks each store shard's crc32 once, before its first use.
    """

    def __init__(
        self,
        merge_strategy: Mapping[str, StrategySpec] | None = None,
        *,
        shuffle: bool = False,
        seed: int = 0,
        block_rows: int = 4096,
        rank: int | None = None,
        world_size: int | None = None,
        even_ranks: Even = "pad",
        buf_size: int = 8,
        token: str | None = None,
        tls_root_certs: bytes | None = None,
        tls_client_cert: tuple[bytes, bytes] | None = None,
        connect_timeout: float = 60.0,
        verify: bool = False,
    ) -> None:
        env_rank, env_world = Sampler.world_from_env()
        self._sampler = Sampler(
            shuffle=shuffle,
            seed=seed,
            block_rows=block_rows,
            rank=env_rank if rank is None else rank,
            world_size=env_world if world_size is None else world_size,
            even=even_ranks,
        )
        self.merge_strategy = dict(merge_strategy or {})
        self.buf_size = buf_size
        self.token = token
        self.tls_root_certs = tls_root_certs
        self.tls_client_cert = tls_client_cert
        self.connect_timeout = connect_timeout
        self.verify = verify
        self.id = uuid.uuid4().hex
        self._registered: list[tuple[str, Callable[[], _OfflineTeacher | _OnlineTeacher]]] = []
        self._teachers: list[_OfflineTeacher | _OnlineTeacher] = []
        self._merger: Merger | None = None  # None after start(): query-only teachers
        self._ready = False  # start() has run
        self._prepared = False  # every teacher's schema is known and checked
        self._closed = False
        self._epoch = 0
        self._prefetcher: Prefetcher[Knowledge] | None = None  # the latest pass
        self._passes: weakref.WeakSet[Prefetcher[Knowledge]] = weakref.WeakSet()
        self._received: dict[int, int] = {}  # teacher id -> messages received

    # -- registration ---------------------------------------------------------------

    def register_teacher(
        self,
        in_path: str | os.PathLike[str] | None = None,
        in_address: str | None = None,
        *,
        name: str | None = None,
        allow_incomplete: bool = False,
        token: str | None = None,
        tls_root_certs: bytes | None = None,
    ) -> int:
        """Register a store (``in_path``) or a served teacher (``in_address="host:port"``);
        returns its teacher id (0, 1, ... in registration order)."""
        if self._ready:
            raise KdserveError("register every teacher before start()")
        if (in_path is None) == (in_address is None):
            raise KdserveError(
                "register_teacher needs one of in_path= (a knowledge store directory) or "
                "in_address= ('host:port' of an online teacher)"
            )
        where = os.fspath(in_path) if in_path is not None else str(in_address)
        label = os.path.basename(os.path.normpath(where)) if in_path is not None else where
        teacher_name = name or f"{len(self._registered)}:{label}"
        if any(n == teacher_name for n, _ in self._registered):
            raise KdserveError(f"a teacher named {teacher_name!r} is already registered")
        if in_path is not None:
            path = os.fspath(in_path)
            self._registered.append(
                (
                    teacher_name,
                    lambda: _OfflineTeacher(teacher_name, path, allow_incomplete, self.verify),
                )
            )
        else:
            address = str(in_address)
            client = TeacherClient(
                address,
                name=teacher_name,
                token=token or self.token,
                tls_root_certs=tls_root_certs or self.tls_root_certs,
                tls_client_cert=self.tls_client_cert,
                connect_timeout=self.connect_timeout,
            )
            self._registered.append((teacher_name, lambda: _OnlineTeacher(teacher_name, client)))
        return len(self._registered) - 1

    def start(self) -> None:
        """End registration: open every store and check that the stores align.

        Online teachers must answer and take the token (waited for up to
        ``connect_timeout``); they are asked for their schema when knowledge is first
        needed (:meth:`get_knowledge_desc`, a pass, ``len``), so messages can be exchanged
        with them before their knowledge service starts, as in Pantheon.
        """
        if self._ready:
            return
        if not self._registered:
            raise KdserveError("register at least one teacher before start()")
        self._teachers = [make() for _, make in self._registered]
        for t in self._teachers:
            if isinstance(t, _OnlineTeacher):
                t.client.ping()  # reachable, and the token fits: fail early, not mid-pass
        if not any(isinstance(t, _OnlineTeacher) for t in self._teachers):
            self._prepare()  # stores only: every check now
        self._ready = True

    def _prepare(self) -> None:
        """Learn what every teacher serves; check their knowledge fits together and aligns."""
        offline = self._offline()
        online = self._online()
        if online and self._sampler.shuffle:
            raise KdserveError(
                "shuffle=True needs offline teachers only: online teachers stream in their "
                "reader's order (shuffle the teachers' readers instead)"
            )
        if not online:
            for t in offline[1:]:
                t.align_to(offline[0])
        merged = [t for t in self._teachers if t in offline or t in online]
        if merged:  # else only query-only teachers: nothing to merge
            self._merger = Merger({t.name: t.schema for t in merged}, self.merge_strategy)
        self._prepared = True

    def _check_ready(self) -> None:
        if self._closed:
            raise KdserveError("this student is closed; create a new Student")
        if not self._ready:
            raise KdserveError("call start() first")

    def _started(self) -> Merger:
        self._check_ready()
        if not self._prepared:
            self._prepare()
        if self._merger is None:
            raise KdserveError(
                "the registered teachers only answer queries (reader_config=None): there is no "
                "knowledge stream to read; use query() or query_stream()"
            )
        return self._merger

    def close(self) -> None:
        """Stop every pass still running (abandoned ones too) and close the connections to
        online teachers."""
        self._closed = True
        for running in list(self._passes):
            running.close()
        for t in self._teachers:
            if isinstance(t, _OnlineTeacher):
                t.client.close()

    def __enter__(self) -> Student:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- knowledge ------------------------------------------------------------------

    def get_knowledge_desc(self) -> dict[str, dict[str, Any]]:
        """The merged knowledge: ``{field: {"shape", "dtype", "lod_level"}}`` (Pantheon style)."""
        return self._started().schema.describe()

    def get_knowledge_qsize(self) -> int:
        """Merged batches prefetched and waiting for the consumer."""
        return self._prefetcher.qsize() if self._prefetcher else 0

    def __len__(self) -> int:
        """Samples in one pass for this rank (offline teachers only)."""
        self._started()
        if self._online():
            raise KdserveError("the length of a pass of online teachers is not known in advance")
        first = self._offline()[0]
        return sum(len(b) for b in self._sampler.plan(len(first.reader)))

    def _online(self) -> list[_OnlineTeacher]:
        return [t for t in self._teachers if isinstance(t, _OnlineTeacher) and t.info["stream"]]

    def _offline(self) -> list[_OfflineTeacher]:
        return [t for t in self._teachers if isinstance(t, _OfflineTeacher)]

    def get_knowledge_generator(
        self, batch_size: int, drop_last: bool = False, *, epoch: int | None = None
    ) -> Callable[[], Iterator[Knowledge]]:
        """A callable; each call yields one more pass of merged batches of ``batch_size``.

        Passes are numbered from 0 per student; ``epoch`` makes the next call read pass
        ``epoch`` instead (its shuffle order, or that pass of online teachers), e.g. for a
        fresh student that resumes training at a later epoch.
        """
        self._started()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if epoch is not None:
            if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
                raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
            self._epoch = epoch

        def one_pass() -> Iterator[Knowledge]:
            epoch = self._epoch
            self._epoch += 1
            produce = self._online_pass if self._online() else self._offline_pass
            self._prefetcher = Prefetcher(
                lambda: produce(epoch, batch_size, drop_last), self.buf_size, "kdserve-student"
            )
            self._passes.add(self._prefetcher)
            yield from self._prefetcher

        return one_pass

    def _merge(self, batches: dict[str, pa.RecordBatch]) -> Knowledge:
        merger = self._started()
        schemas = {t.name: t.schema for t in self._teachers}
        return merger.merge({n: from_record_batch(b, schemas[n]) for n, b in batches.items()})

    def _offline_pass(self, epoch: int, batch_size: int, drop_last: bool) -> Iterator[Knowledge]:
        teachers = self._offline()
        blocks = self._sampler.plan(len(teachers[0].reader), epoch)
        streams = [rebatch(t.batches(blocks), batch_size, drop_last) for t in teachers]
        for batches in zip(*streams, strict=True):
            yield self._merge({t.name: b for t, b in zip(teachers, batches, strict=True)})

    def _online_pass(self, epoch: int, batch_size: int, drop_last: bool) -> Iterator[Knowledge]:
        online = self._online()
        for t in online:
            if epoch >= t.info["times"]:
                raise KdserveError(
                    f"teacher {t.name!r} serves {t.info['times']} pass(es) (its times=); this "
                    f"would be pass {epoch + 1}"
                )
        # Each teacher is read by its own thread, buf_size batches ahead: network reads of
        # several teachers overlap, and a slow student still slows them all down.
        streams = [
            Prefetcher(
                functools.partial(rebatch, self._online_share(t, epoch), batch_size, drop_last),
                self.buf_size,
                f"kdserve-{t.name}",
            )
            for t in online
        ]
        try:
            yield from self._merge_online(online, streams, epoch)
        finally:
            for stream in streams:
                stream.close()

    def _online_share(self, teacher: _OnlineTeacher, epoch: int) -> Iterator[pa.RecordBatch]:
        """This rank's batches of an online teacher's pass: repeated sample ids refused;
        with several ranks, evened to the others' shares (``even_ranks``) once the pass
        is over, since the teacher deals whole batches to ranks in turn."""
        rank, world = self._sampler.rank, self._sampler.world_size
        even = self._sampler.even if world > 1 else "none"
        ack_every = max(1, teacher.info["buf_size"] // 2)
        seen = IdSet()
        rows = 0
        first: pa.RecordBatch | None = None  # padding repeats this rank's first rows
        held: pa.RecordBatch | None = None  # dropping may cut the last batch
        shares: list[int] = []  # every rank's rows, told at the end of the pass
        for batch in teacher.client.stream_pass(epoch, rank, world, ack_every, shares):
            ids = batch.column(0).to_numpy()
            if not seen.add_new(ids):
                where = f"a batch of online teacher {teacher.name!r}"
                _refuse_repeats(ids, where, teacher.name)
                again = ids[seen.contains(ids)]
                raise AlignmentError(
                    f"online teacher {teacher.name!r} sent sample id(s) {again[:5].tolist()} "
                    f"twice in pass {epoch}: each sample must appear once per pass; fix the "
                    f"teacher's reader or its sample_id feed",
                    teachers=(teacher.name, teacher.name),
                    sample_ids=(int(again[0]), int(again[0])),
                )
            rows += batch.num_rows
            first = batch if first is None else first
            ready: pa.RecordBatch | None = batch
            if even == "drop":  # one batch behind: the last one may have to be cut
                ready, held = held, batch
            if ready is not None:
                yield ready
        if even == "none":
            return
        if len(shares) != world:
            raise ProtocolError(
                f"online teacher {teacher.name!r} ended pass {epoch} without telling the "
                f"ranks' shares (got {shares}); is it an older kdserve? Use even_ranks='none'"
            )
        if even == "pad":
            missing = max(shares) - rows
            while missing > 0 and first is not None:
                piece = first.slice(0, missing)
                yield piece
                missing -= piece.num_rows
        elif held is not None:
            keep = held.num_rows - (rows - min(shares))
            if keep < 0:
                raise KdserveError(
                    f"online teacher {teacher.name!r}'s batches differ too much in size for "
                    f"even_ranks='drop' (rank {rank} has {rows} rows, the smallest share is "
                    f"{min(shares)}); use even_ranks='pad' or batches of one size"
                )
            if keep:
                yield held.slice(0, keep)

    def _merge_online(
        self,
        online: list[_OnlineTeacher],
        streams: list[Prefetcher[pa.RecordBatch]],
        epoch: int,
    ) -> Iterator[Knowledge]:
        driver = online[0]
        for batches in itertools.zip_longest(*streams):
            if any(b is None for b in batches):
                short = [t.name for t, b in zip(online, batches, strict=True) if b is None]
                raise AlignmentError(
                    f"online teachers {short} ended pass {epoch} before {driver.name!r}: they "
                    f"do not serve the same samples",
                    teachers=(driver.name, short[0]),
                    sample_ids=(None, None),
                )
            by_name = {t.name: b for t, b in zip(online, batches, strict=True)}
            ids = by_name[driver.name].column(0).to_numpy()
            for store in self._offline():
                by_name[store.name] = store.reader.take(store.rows_for(ids, driver.name))
            yield self._merge(by_name)

    # -- messages and queries -------------------------------------------------------

    def _client(self, teacher_id: int) -> TeacherClient:
        self._check_ready()
        if not 0 <= teacher_id < len(self._teachers):
            raise KdserveError(f"no teacher {teacher_id}; ids run 0..{len(self._teachers) - 1}")
        teacher = self._teachers[teacher_id]
        if not isinstance(teacher, _OnlineTeacher):
            raise KdserveError(f"teacher {teacher.name!r} is offline (a store): no messages")
        return teacher.client

    def send(self, data: Any, teacher_ids: Iterable[int] | None = None) -> None:
        """Send a message (JSON values and numpy arrays) to online teachers (default: all)."""
        self._check_ready()
        ids = (
            [i for i, t in enumerate(self._teachers) if isinstance(t, _OnlineTeacher)]
            if teacher_ids is None
            else list(teacher_ids)
        )
        for i in ids:
            self._client(i).send(self.id, data)

    def recv(self, teacher_id: int, timeout: float | None = None) -> Any:
        """The next message from teacher ``teacher_id``; waits up to ``timeout`` seconds
        (None: until one comes). Raises TimeoutError when none came."""
        client = self._client(teacher_id)
        after = self._received.get(teacher_id, 0)
        waited = 0.0
        while timeout is None or waited < timeout:
            step = 1.0 if timeout is None else min(1.0, timeout - waited)
            messages = client.recv(after, step)
            if messages:
                self._received[teacher_id] = after + 1
                return messages[0]
            waited += step
        raise TimeoutError(f"no message from teacher {client.name!r} within {timeout} s")

    def query(self, teacher_id: int, inputs: Mapping[str, Any]) -> Knowledge:
        """Query mode: send one batch of inputs, get the teacher's knowledge for it."""
        return next(self.query_stream(teacher_id, [inputs], max_in_flight=1))

    def query_stream(
        self, teacher_id: int, batches: Iterable[Mapping[str, Any]], max_in_flight: int = 4
    ) -> Iterator[Knowledge]:
        """Query mode over many input batches, ``max_in_flight`` requests pipelined to hide
        the round trip; results come in input order. Sample ids are taken from a
        ``sample_id`` input or numbered 0..n-1 per batch."""
        client = self._client(teacher_id)

        def arrow() -> Iterator[pa.RecordBatch]:
            for inputs in batches:
                data = dict(inputs)
                ids = data.pop(SAMPLE_ID, None)
                n = len(next(iter(data.values())))
                schema = Schema.from_arrays(data)
                yield to_record_batch(data, schema, np.arange(n) if ids is None else ids)

        for result in client.query(arrow(), max_in_flight):
            yield from_record_batch(result)


def _refuse_repeats(ids: np.ndarray, where: str, teacher: str) -> None:
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
