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

and the same in Python's idiom::

    with Student(merge_strategy={"logits": "mean"}) as student:
        student.add_store("knowledge/teacher_a")
        student.add_teacher("127.0.0.1:8470")
        loader = student.loader(batch_size=32)
        for epoch in range(3):
            for batch in loader:     # each iteration is one more pass
                ...

Teachers are matched by sample id, never by arrival order. With online teachers, the
first online teacher's stream sets the order of a pass; other online teachers must
stream the same samples (each batch is realigned by id), and offline teachers are
looked up by id. With only offline teachers, the first one sets the order (block
shuffled with ``shuffle=True``), and the others are matched to it by id. Teachers that
do not hold the same samples are refused with an :class:`~kdserve.errors.AlignmentError`.
The sources (:mod:`kdserve.student.sources`) own the stores and connections; the passes
(:mod:`kdserve.student.passes`) align them; this façade merges and prefetches.
"""

from __future__ import annotations

import os
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from kdserve.core.batch import Knowledge
from kdserve.core.merge import Merger, StrategySpec
from kdserve.core.prefetch import Prefetcher
from kdserve.core.sampler import Even, Sampler
from kdserve.core.wait import seconds
from kdserve.errors import KdserveError
from kdserve.online.client import TeacherClient
from kdserve.student.messaging import recv_message
from kdserve.student.passes import Step, served_pass, store_pass
from kdserve.student.sources import (
    Source,
    StoreSource,
    StreamSource,
    TeacherSource,
    refuse_mixed_vocabularies,
)
from kdserve.student.vocab_map import VocabMap

__all__ = ["Loader", "Student"]


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
    to online teachers; ``buf_size`` batches are prefetched in the background. A served
    teacher that sends nothing while a pass waits for it (alive, but its program stuck)
    is warned about each minute and, after ``stall_timeout`` seconds (None: never),
    raises :class:`~kdserve.TeacherUnavailableError` naming it.
    ``verify=True`` checks each store shard's crc32 once, before its first use.
    ``expect`` (e.g. ``{"tokenizer": "<hash>", "vocab_size": 32000}``) is the provenance
    every teacher must record (``Teacher(provenance=...)``): a store when the student
    starts, an online teacher when its knowledge is first needed (it reports its
    provenance once its knowledge service runs). Teachers whose ``vocab_size`` or
    ``tokenizer`` differ are never merged, unless registered with a ``vocab_map``
    (:class:`~kdserve.VocabMap`) that rewrites their top-k indices into the student's
    vocabulary. :meth:`get_teacher_desc` shows what each teacher records.
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
        expect: Mapping[str, Any] | None = None,
        stall_timeout: float | None = 600.0,
    ) -> None:
        self.connect_timeout = seconds("connect_timeout", connect_timeout)
        self.stall_timeout = (
            None if stall_timeout is None else seconds("stall_timeout", stall_timeout)
        )
        if merge_strategy is not None and not isinstance(merge_strategy, Mapping):
            raise TypeError(
                f"merge_strategy maps each field several teachers give to a strategy, e.g. "
                f"{{'logits': 'mean'}}; got {merge_strategy!r}"
            )
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
        self.verify = verify
        self.expect = dict(expect or {})
        self.id = uuid.uuid4().hex
        self._sources: list[Source] = []
        self._stores: list[StoreSource] = []
        self._served: list[StreamSource] = []
        self._merger: Merger | None = None  # None after start(): query-only teachers
        self._ready = False  # start() has run
        self._prepared = False  # every teacher's schema is known and checked
        self._closed = False
        self._epoch = 0
        self._prefetcher: Prefetcher[Knowledge] | None = None  # the latest pass
        self._passes: weakref.WeakSet[Prefetcher[Knowledge]] = weakref.WeakSet()
        self._received: dict[int, int] = {}  # teacher id -> messages received

    # -- registration ---------------------------------------------------------------

    def add_store(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        allow_incomplete: bool = False,
        vocab_map: VocabMap | None = None,
    ) -> int:
        """Register a knowledge store; returns its teacher id (0, 1, ... in order).
        ``vocab_map`` (:class:`~kdserve.VocabMap`) maps its token ids to the student's."""
        where = os.fspath(path)
        source = StoreSource(
            self._name(name, os.path.basename(os.path.normpath(where))),
            where,
            allow_incomplete,
            self.verify,
            self.expect,
            vocab_map,
        )
        self._stores.append(source)
        return self._add(source)

    def add_teacher(
        self,
        address: str,
        *,
        name: str | None = None,
        token: str | None = None,
        tls_root_certs: bytes | None = None,
        vocab_map: VocabMap | None = None,
    ) -> int:
        """Register a served teacher at ``"host:port"``; returns its teacher id.
        ``vocab_map`` (:class:`~kdserve.VocabMap`) maps its token ids to the student's."""
        teacher_name = self._name(name, str(address))
        client = TeacherClient(
            str(address),
            name=teacher_name,
            token=token or self.token,
            tls_root_certs=tls_root_certs or self.tls_root_certs,
            tls_client_cert=self.tls_client_cert,
            connect_timeout=self.connect_timeout,
            stall_timeout=self.stall_timeout,
        )
        source = TeacherSource(teacher_name, client, self.expect, vocab_map)
        self._served.append(source)
        return self._add(source)

    def add_pool(
        self, pool: str, *, name: str | None = None, vocab_map: VocabMap | None = None
    ) -> int:
        """Register the Ray teacher pool named ``pool`` (:mod:`kdserve.ray`; its
        ``serve()`` gives the passes); returns its teacher id. Its passes drive the
        student's, as a served teacher's do; ``vocab_map`` is :meth:`add_store`'s."""
        from kdserve.ray.source import PoolSource

        source = PoolSource(self._name(name, f"pool:{pool}"), pool, self.expect, vocab_map)
        self._served.append(source)
        return self._add(source)

    def register_teacher(
        self,
        in_path: str | os.PathLike[str] | None = None,
        in_address: str | None = None,
        *,
        in_pool: str | None = None,
        name: str | None = None,
        allow_incomplete: bool = False,
        token: str | None = None,
        tls_root_certs: bytes | None = None,
        vocab_map: VocabMap | None = None,
    ) -> int:
        """Pantheon's registration: a store (``in_path``), a served teacher
        (``in_address="host:port"``) or a Ray teacher pool (``in_pool=name``); returns its
        teacher id (0, 1, ... in order). ``vocab_map`` is :meth:`add_store`'s."""
        if sum(x is not None for x in (in_path, in_address, in_pool)) != 1:
            raise KdserveError(
                "register_teacher needs exactly one of in_path= (a knowledge store directory), "
                "in_address= ('host:port' of an online teacher) or in_pool= (a Ray teacher "
                "pool's name)"
            )
        if in_pool is not None:
            return self.add_pool(in_pool, name=name, vocab_map=vocab_map)
        if in_path is not None:
            return self.add_store(
                in_path, name=name, allow_incomplete=allow_incomplete, vocab_map=vocab_map
            )
        assert in_address is not None
        return self.add_teacher(
            in_address,
            name=name,
            token=token,
            tls_root_certs=tls_root_certs,
            vocab_map=vocab_map,
        )

    def _name(self, name: str | None, label: str) -> str:
        """The teacher's name (``"<id>:<label>"`` by default); refused before start()."""
        if self._ready:
            raise KdserveError("register every teacher before start()")
        chosen = name or f"{len(self._sources)}:{label}"
        if any(s.name == chosen for s in self._sources):
            raise KdserveError(f"a teacher named {chosen!r} is already registered")
        return chosen

    def _add(self, source: Source) -> int:
        self._sources.append(source)
        return len(self._sources) - 1

    def start(self) -> None:
        """End registration: open every store and check that the stores align and record
        the provenance ``expect`` asks for.

        Online teachers must answer and take the token (waited for up to
        ``connect_timeout``); they are asked for their schema and provenance when
        knowledge is first needed (:meth:`get_knowledge_desc`, a pass, ``len``, a query),
        so messages can be exchanged with them before their knowledge service starts, as
        in Pantheon.
        """
        if self._ready:
            return
        if not self._sources:
            raise KdserveError("register at least one teacher before start()")
        for source in self._sources:
            source.open()
        if not self._served:
            self._prepare()  # stores only: every check now
        self._ready = True

    def _prepare(self) -> None:
        """Learn what every teacher serves; check their knowledge fits together and aligns."""
        streaming = self._streaming()
        if streaming and self._sampler.shuffle:
            raise KdserveError(
                "shuffle=True needs offline teachers only: online teachers stream in their "
                "reader's order. Shuffle on the teacher instead: its reader function may take "
                "the pass number (kd.serve(program, lambda epoch: batches(epoch), ...)); "
                "give each sample its sample_id"
            )
        refuse_mixed_vocabularies(self._sources)
        if not streaming:
            for store in self._stores[1:]:
                store.align_to(self._stores[0])
        merged = [s for s in self._sources if s.streams]
        if merged:  # else only query-only teachers: nothing to merge
            self._merger = Merger({s.name: s.knowledge_schema for s in merged}, self.merge_strategy)
        self._prepared = True

    def _streaming(self) -> list[StreamSource]:
        """The served teachers that stream knowledge (not query-only ones)."""
        return [t for t in self._served if t.streams]

    def _check_ready(self) -> None:
        """Refuse a closed student; start one that was not started (``start()`` is
        Pantheon's step, implied by any use)."""
        if self._closed:
            raise KdserveError("this student is closed; create a new Student")
        self.start()

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
        for served in self._served:  # first: a pass's thread blocked reading one returns
            served.cancel()
        for running in list(self._passes):
            running.close()
        for source in self._sources:
            source.close()

    def __enter__(self) -> Student:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- knowledge ------------------------------------------------------------------

    def get_knowledge_desc(self) -> dict[str, dict[str, Any]]:
        """The merged knowledge: ``{field: {"shape", "dtype", "lod_level"}}`` (Pantheon
        style), decoded; each teacher's codecs are in :meth:`get_teacher_desc`."""
        return self._started().schema.describe()

    def get_teacher_desc(self) -> dict[str, dict[str, Any]]:
        """What each teacher records, by its name here: ``store`` (path) or ``address``,
        its ``name`` and ``model``, the ``kdserve_version`` that wrote (or serves) it, its
        ``provenance``, its ``fields`` as it gives them (codecs with their parameters:
        TopK's ``k``, ``kind``, ``tail``), and its ``vocab_map`` if it has one. Online
        teachers are asked once their knowledge service runs."""
        self._check_ready()
        return {s.name: s.describe() for s in self._sources}

    def get_knowledge_qsize(self) -> int:
        """Merged batches prefetched and waiting for the consumer."""
        return self._prefetcher.qsize() if self._prefetcher else 0

    def __len__(self) -> int:
        """Samples in one pass for this rank (offline teachers only)."""
        self._started()
        if self._streaming():
            raise KdserveError("the length of a pass of online teachers is not known in advance")
        return sum(len(b) for b in self._sampler.plan(len(self._stores[0])))

    def get_knowledge_generator(
        self,
        batch_size: int,
        drop_last: bool = False,
        *,
        epoch: int | None = None,
        decode: bool = True,
    ) -> Callable[[], Iterator[Knowledge]]:
        """A callable; each call yields one more pass of merged batches of ``batch_size``.

        Passes are numbered from 0 per student; ``epoch`` makes the next call read pass
        ``epoch`` instead (its shuffle order, or that pass of online teachers), e.g. for a
        fresh student that resumes training at a later epoch. ``decode=False`` delivers
        coded fields in their compact form, a dict of the codec's components (for
        :class:`~kdserve.TopK`: ``values``, ``indices``, ``tail``, ready for
        ``topk_kd_loss``), never expanded to dense arrays.
        """
        return self._pass_reader(batch_size, drop_last, epoch, decode, None)

    def _pass_reader(
        self,
        batch_size: int,
        drop_last: bool,
        epoch: int | None,
        decode: bool,
        transform: Callable[[Knowledge], Any] | None,
    ) -> Callable[[], Iterator[Any]]:
        """The options checked; then each call of the result is one more pass, prefetched
        (and transformed) on a background thread."""
        merger = self._started()
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if epoch is not None:
            if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
                raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
            self._epoch = epoch
        if not decode:
            merger.check_compact()  # a TopK mixture merges compactly; other codecs cannot

        def one_pass() -> Iterator[Any]:
            if self._served and any(p.running for p in list(self._passes)):
                raise KdserveError(
                    "a pass of this student is still being read: served teachers stream "
                    "their passes in order, so finish it (or break out of its loop) before "
                    "starting the next"
                )
            epoch = self._epoch
            self._epoch += 1
            self._prefetcher = Prefetcher(
                lambda: self._pass(epoch, batch_size, drop_last, transform, decode),
                self.buf_size,
                "kdserve-student",
            )
            self._passes.add(self._prefetcher)
            yield from self._prefetcher

        return one_pass

    def loader(
        self,
        batch_size: int,
        drop_last: bool = False,
        *,
        epoch: int | None = None,
        decode: bool = True,
        transform: Callable[[Knowledge], Any] | None = None,
    ) -> Loader:
        """The passes as a re-iterable: each ``for batch in loader`` reads one more pass.
        ``decode`` is :meth:`get_knowledge_generator`'s. ``transform`` is applied to each
        batch on the prefetch thread, off the training loop's (e.g.
        :func:`kdserve.torch.to_tensors`, which can pin memory)."""
        passes = self._pass_reader(batch_size, drop_last, epoch, decode, transform)
        return Loader(self, passes, batch_size, drop_last)

    def _pass(
        self,
        epoch: int,
        batch_size: int,
        drop_last: bool,
        transform: Callable[[Knowledge], Any] | None = None,
        decode: bool = True,
    ) -> Iterator[Any]:
        """One pass of merged batches (run on the prefetch thread)."""
        streaming = self._streaming()
        steps: Iterator[Step]
        if streaming:
            steps = served_pass(
                streaming,
                self._stores,
                self._sampler,
                epoch,
                batch_size,
                drop_last,
                self.buf_size,
                self.stall_timeout,
            )
        else:
            steps = store_pass(self._stores, self._sampler, epoch, batch_size, drop_last)
        merger = self._started()
        sources = {s.name: s for s in self._sources}
        for step in steps:
            batch = merger.merge({n: sources[n].knowledge(b, decode) for n, b in step.items()})
            yield batch if transform is None else transform(batch)

    # -- messages and queries -------------------------------------------------------

    def _source(self, teacher_id: int) -> Source:
        self._check_ready()
        if not 0 <= teacher_id < len(self._sources):
            raise KdserveError(f"no teacher {teacher_id}; ids run 0..{len(self._sources) - 1}")
        return self._sources[teacher_id]

    def _client(self, teacher_id: int) -> TeacherClient:
        return self._source(teacher_id).client()

    def send(self, data: Any, teacher_ids: Iterable[int] | None = None) -> None:
        """Send a message (JSON values and numpy arrays) to online teachers (default: all)."""
        self._check_ready()
        ids = (
            [i for i, s in enumerate(self._sources) if s in self._served]
            if teacher_ids is None
            else list(teacher_ids)
        )
        if teacher_ids is None and not ids:
            raise KdserveError(
                "send(): this student has no online teacher to send to (stores take no "
                "messages); register one with add_teacher()/register_teacher(in_address=)"
            )
        for i in ids:
            self._client(i).send(self.id, data)

    def recv(self, teacher_id: int, timeout: float | None = None) -> Any:
        """The next message from teacher ``teacher_id``; waits up to ``timeout`` seconds
        (None: until one comes). Raises TimeoutError when none came."""
        after = self._received.get(teacher_id, 0)
        message = recv_message(self._client(teacher_id), after, timeout)
        self._received[teacher_id] = after + 1
        return message

    def query(
        self, teacher_id: int, inputs: Mapping[str, Any], *, decode: bool = True
    ) -> Knowledge:
        """Query mode: send one batch of inputs, get the teacher's knowledge for it."""
        return next(self.query_stream(teacher_id, [inputs], max_in_flight=1, decode=decode))

    def query_stream(
        self,
        teacher_id: int,
        batches: Iterable[Mapping[str, Any]],
        max_in_flight: int = 4,
        *,
        decode: bool = True,
    ) -> Iterator[Knowledge]:
        """Query mode over many input batches, ``max_in_flight`` requests pipelined to hide
        the round trip; results come in input order. Sample ids are taken from a
        ``sample_id`` input or numbered 0..n-1 per batch. ``decode=False`` keeps coded
        fields compact, as :meth:`get_knowledge_generator` does (on-policy top-k)."""
        if (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or max_in_flight < 1
        ):
            raise ValueError(f"max_in_flight must be an int >= 1, got {max_in_flight!r}")
        source = self._source(teacher_id)
        if not isinstance(source, StreamSource):
            source.client()  # a store: refused, naming it
        assert isinstance(source, StreamSource)
        return source.query(batches, max_in_flight, decode)


class Loader:
    """A student's passes as a re-iterable, like a DataLoader: each iteration is one pass."""

    def __init__(
        self,
        student: Student,
        passes: Callable[[], Iterator[Any]],
        batch_size: int,
        drop_last: bool,
    ) -> None:
        self.batch_size = batch_size
        self.drop_last = drop_last
        self._student = student
        self._passes = passes

    def __iter__(self) -> Iterator[Any]:
        return self._passes()

    def __len__(self) -> int:
        """Batches in one pass for this rank. A pass of served teachers has no length known
        in advance: TypeError, as for any iterable without one (``list()`` copes)."""
        if self._student._streaming():
            raise TypeError("a pass of online teachers has no length known in advance")
        samples = len(self._student)
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)
