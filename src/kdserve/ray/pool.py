"""Teacher pools on Ray: N replicas of a teacher as actors under one name, which students
find through Ray, query with load balancing and failover, and which dump a dataset in
parallel into one store.

The pool's name is a Ray actor (the registry) in the ``kdserve`` namespace: it holds the
pool's token and its replicas' addresses. Replicas register themselves, also after Ray
restarts one that crashed. Knowledge moves between processes over Arrow Flight (queries)
or as Arrow files (dumps), never pickled; Ray ships only the user's factories.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from kdserve.core.batch import Knowledge, from_record_batch
from kdserve.core.schema import SAMPLE_ID
from kdserve.errors import KdserveError, StoreError, TeacherUnavailableError
from kdserve.online.client import TeacherClient
from kdserve.ray.replica import Replica
from kdserve.store.combine import combine
from kdserve.store.files import write_atomic
from kdserve.student.messaging import query_batches
from kdserve.teacher.encoder import Keep
from kdserve.teacher.teacher import checked_provenance

__all__ = ["NAMESPACE", "PoolClient", "TeacherPool", "find_pool", "pool_status"]

NAMESPACE = "kdserve"  # the Ray namespace pools are registered in
_PARTS = "parts"  # a pooled dump's per-part stores, under its path
_PARTS_FILE = "parts.json"  # how many parts the dump was split into


class _Registry:
    """The pool by name: its token, the address of each live replica, and the figures
    its students report (samples each replica answered; each student's stall time)."""

    def __init__(self, token: str, provenance: dict[str, Any]) -> None:
        self.token = token
        self.provenance = provenance  # what makes the pool's knowledge comparable
        self.replicas: dict[str, str] = {}
        self.answered: dict[str, int] = {}
        self.students: dict[str, dict[str, float]] = {}
        self.data: Any = None  # the passes' data factory (an ObjectRef: serve), parts
        self.parts = 0
        # (pass, part) -> the replica computing it, [its knowledge, its rows] (ObjectRefs)
        self.work: dict[tuple[int, int], tuple[str, list[Any]]] = {}
        self.sizes: dict[tuple[int, int], int] = {}  # rows of the parts students have read
        self.turn = 0

    def report(self, student: str, answered: dict[str, int], figures: dict[str, float]) -> None:
        for replica, samples in answered.items():
            self.answered[replica] = self.answered.get(replica, 0) + samples
        self.students[student] = figures

    def figures(self) -> tuple[dict[str, int], dict[str, dict[str, float]]]:
        return dict(self.answered), dict(self.students)

    # -- passes over the pool's own data: parts computed on demand, spread over replicas

    def serve(self, data_factory: list[Any], parts: int) -> None:
        self.data, self.parts = data_factory[0], parts
        self.work.clear()
        self.sizes.clear()

    def layout(self) -> int:
        """How many parts a pass has (0: the pool serves no passes)."""
        return self.parts

    def part(self, epoch: int, part: int, avoid: str | None = None) -> list[Any]:
        """A part's knowledge and its rows, as ``[ObjectRef, ObjectRef]`` (asked of a
        replica the first time, or again of another than ``avoid`` when that one died with
        it)."""
        key = (epoch, part)
        while key not in self.work or avoid is not None:
            names = sorted(set(self.replicas) - {avoid}) or sorted(self.replicas)
            if not names:
                raise TeacherUnavailableError("the teacher pool has no replica left")
            name = names[self.turn % len(names)]
            self.turn += 1
            try:
                actor = ray.get_actor(_replica_name(name), namespace=NAMESPACE)
            except ValueError:  # killed for good: forget it, ask the next
                self.unregister(name)
                continue
            self.work[key] = (name, actor.compute.remote(self.data, epoch, part, self.parts))
            avoid = None
        return self.work[key][1]

    def rows(self, epoch: int) -> list[Any]:
        """Every part's rows in pass ``epoch``, so that ranks can even their shares: a
        number for a part a student has read, else ``[ObjectRef]`` of the count (parts no
        student asked for yet are computed now, for the rank that will read them)."""
        out: list[Any] = []
        for part in range(self.parts):
            known = self.sizes.get((epoch, part))
            out.append(known if known is not None else [self.part(epoch, part)[1]])
        return out

    def again(self, epoch: int, part: int) -> list[Any] | int:
        """After the replica computing a part died for good: the part asked of another
        (as :meth:`part` gives it), or its rows if a student has read it meanwhile."""
        known = self.sizes.get((epoch, part))
        if known is not None:
            return known
        work = self.work.get((epoch, part))
        return self.part(epoch, part, None if work is None else work[0])

    def taken(self, epoch: int, part: int, rows: int) -> None:
        """A student has the part (``rows`` of it): its knowledge leaves the object store;
        the rows are kept for the pass (older passes' are dropped)."""
        self.work.pop((epoch, part), None)
        self.sizes[(epoch, part)] = rows
        for old in [k for k in self.sizes if k[0] < epoch - 1]:
            del self.sizes[old]

    def register(self, name: str, address: str) -> None:
        self.replicas[name] = address

    def unregister(self, name: str) -> None:
        self.replicas.pop(name, None)

    def lookup(self) -> tuple[str, dict[str, str]]:
        return self.token, dict(self.replicas)

    def recorded(self) -> dict[str, Any]:
        return dict(self.provenance)


def _registry_name(name: str) -> str:
    return f"kdserve-pool:{name}"


def _replica_name(name: str) -> str:
    return f"kdserve-replica:{name}"


def find_pool(name: str) -> Any:
    """The registry actor of pool ``name``; KdserveError naming the fix if there is none."""
    try:
        return ray.get_actor(_registry_name(name), namespace=NAMESPACE)
    except ValueError:
        raise KdserveError(
            f"no teacher pool named {name!r} in Ray namespace {NAMESPACE!r}: start it with "
            f"kdserve.ray.TeacherPool({name!r}, ...) on this Ray cluster"
        ) from None


def pool_status(name: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Pool ``name``'s figures, from any process attached to its Ray cluster:
    ``"replicas"``: per live replica, its address, the samples it dumped and their rate,
    and the samples it answered to students' queries; ``"students"``: per student
    (a PoolClient, or one rank's pass of a Student's pool), the batches or parts it
    received, the seconds it waited for them (stall) and the mean number it had in
    flight."""
    registry = find_pool(name)
    _, replicas = ray.get(registry.lookup.remote())
    answered, students = ray.get(registry.figures.remote())
    handles = {}
    for replica in sorted(replicas):
        try:
            handles[replica] = ray.get_actor(_replica_name(replica), namespace=NAMESPACE)
        except ValueError:  # killed for good, not yet noticed by a student: not live
            continue
    stats = ray.get([h.stats.remote() for h in handles.values()])
    for replica, figures in zip(handles, stats, strict=True):
        figures["answered"] = answered.get(replica, 0)
    return {"replicas": dict(zip(handles, stats, strict=True)), "students": students}


class TeacherPool:
    """``replicas`` copies of a teacher as Ray actors, registered under ``name``.

    ``program_factory()`` builds the program in each actor (so a model loads where it
    runs, on that actor's ``num_gpus``); ``feeds`` names the inputs a query carries and
    ``keep`` the knowledge, as for :func:`kdserve.serve`. Replicas listen on ``host``
    (127.0.0.1: one machine; a node's address on a cluster, where TLS belongs too) with
    a token made for the pool. A replica that dies is restarted by Ray. ``provenance``
    (as :class:`~kdserve.Teacher`'s) is what students' ``expect=`` checks, for passes and
    queries alike.
    """

    def __init__(
        self,
        name: str,
        program_factory: Callable[[], Any],
        *,
        feeds: Sequence[str],
        keep: Keep | None = None,
        replicas: int = 1,
        num_cpus: float = 1,
        num_gpus: float = 0,
        host: str = "127.0.0.1",
        provenance: Mapping[str, str | int | float | bool] | None = None,
    ) -> None:
        if not ray.is_initialized():
            raise KdserveError(
                "TeacherPool needs Ray: call ray.init() (or ray.init(address=...)) first"
            )
        if replicas < 1:
            raise ValueError(f"a pool needs replicas >= 1, got {replicas}")
        self.name = name
        # Held here for the pool's life: Ray restarts a replica from this very object.
        self._factory = ray.put(program_factory)
        recorded = checked_provenance(provenance or {})
        self._options = {"feeds": list(feeds), "keep": keep, "host": host, "provenance": recorded}
        self._resources = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        try:
            ray.get_actor(_registry_name(name), namespace=NAMESPACE)
        except ValueError:
            pass
        else:
            raise KdserveError(f"a teacher pool named {name!r} exists already; choose another name")
        self._token: str = secrets.token_urlsafe(32)
        self._registry: Any = (
            ray.remote(_Registry)
            .options(name=_registry_name(name), namespace=NAMESPACE, num_cpus=0)
            .remote(self._token, recorded)
        )
        self._replicas: dict[str, Any] = {}
        self._next = 0
        self.scale(replicas)

    # -- replicas ---------------------------------------------------------------------

    def scale(self, replicas: int) -> None:
        """Grow or shrink the pool to ``replicas`` (the newest go first); returns when the
        new ones answer. Students in a query stream move to the remaining ones."""
        if replicas < 1:
            raise ValueError(f"a pool needs replicas >= 1, got {replicas}")
        started = []
        while len(self._replicas) < replicas:
            name = f"{self.name}-{self._next}"
            self._next += 1
            actor: Any = (
                ray.remote(Replica)
                .options(
                    name=_replica_name(name),
                    namespace=NAMESPACE,
                    max_restarts=-1,
                    max_task_retries=-1,
                    **self._resources,
                )
                .remote(name, self._registry, self._factory, token=self._token, **self._options)
            )
            self._replicas[name] = actor
            started.append(actor.address.remote())
        ray.get(started)
        while len(self._replicas) > replicas:
            name, actor = self._replicas.popitem()
            ray.get(self._registry.unregister.remote(name))
            ray.kill(actor, no_restart=True)

    @property
    def replicas(self) -> dict[str, Any]:
        """The replicas' actor handles by name."""
        return dict(self._replicas)

    def status(self) -> dict[str, dict[str, dict[str, Any]]]:
        """This pool's figures: :func:`pool_status`."""
        return pool_status(self.name)

    def close(self) -> None:
        """Stop every replica and remove the pool's name."""
        for actor in self._replicas.values():
            ray.kill(actor, no_restart=True)
        self._replicas.clear()
        ray.kill(self._registry, no_restart=True)

    def __enter__(self) -> TeacherPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- passes -----------------------------------------------------------------------

    def serve(
        self,
        data_factory: Callable[[int, int, int], Iterable[Mapping[str, Any]]],
        parts: int | None = None,
    ) -> None:
        """Serve passes over the pool's own data to students that register the pool
        (``Student.add_pool``): ``data_factory(epoch, part, parts)`` gives a part's input
        batches (with globally unique ``sample_id``s). Parts are the unit of work: each
        is computed by one replica when a student needs it, and again by another if that
        one dies (default: 4 per replica, so that a pool that grows has work to share)."""
        count = parts or 4 * len(self._replicas)
        # In a list, the reference reaches the registry unresolved: each part's task gets
        # it and Ray resolves it there, so the factory is serialised once, not per part.
        ray.get(self._registry.serve.remote([ray.put(data_factory)], count))

    # -- offline ----------------------------------------------------------------------

    def dump(
        self,
        data_factory: Callable[[int, int], Iterable[Mapping[str, Any]]],
        path: str | Path,
        **options: Any,
    ) -> int:
        """Dump a dataset with every replica: ``data_factory(part, parts)`` gives part
        ``part``'s batches (with globally unique ``sample_id``s), each part goes to its own
        store under ``path/parts``, and the parts become one store at ``path``; returns
        its rows. Run again after an interruption, it resumes each part (with the number
        of parts it started with) and combines them. ``options`` are :func:`kdserve.dump`'s
        (``compression``, ``shard_bytes``, ...)."""
        out = Path(path)
        root = out / _PARTS
        parts = _parts(root, len(self._replicas))
        actors = list(self._replicas.values())
        stores = [root / f"part-{i:04d}" for i in range(parts)]
        options = {"progress": False, "name": self.name, **options}  # one teacher, one schema
        calls = [
            actors[i % len(actors)].dump.remote(data_factory, i, parts, str(s), options)
            for i, s in enumerate(stores)
        ]
        failures = []
        for call in calls:  # every part finishes or fails before the first error is raised
            try:
                ray.get(call)
            except Exception as exc:  # a part that failed: it resumes next time
                failures.append(exc)
        if failures:
            raise failures[0]
        return combine(stores, out)


def _parts(root: Path, replicas: int) -> int:
    """How many parts the pooled dump under ``root`` has: recorded by its first run (a
    resumed dump keeps them, however many replicas it has now), else ``replicas``."""
    record = root / _PARTS_FILE
    if record.is_file():
        try:
            parts = json.loads(record.read_text(encoding="utf-8"))["parts"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{record} is unreadable: {exc}", path=str(record)) from None
        if not isinstance(parts, int) or parts < 1:
            raise StoreError(f"{record} records {parts!r} parts", path=str(record))
        return parts
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(record, json.dumps({"parts": replicas}) + "\n")
    return replicas


class PoolClient:
    """A student's view of the pool ``name``: queries spread over its replicas, each
    failed one asked again of another replica (found again through Ray)."""

    def __init__(self, name: str, *, timeout: float = 60.0, connect_timeout: float = 10.0) -> None:
        self._registry = find_pool(name)
        self.name = name
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._clients: dict[str, TeacherClient] = {}
        self._turn = 0
        self._lock = threading.Lock()
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.answered: dict[str, int] = {}  # queries each replica answered
        self._samples: dict[str, int] = {}  # samples each answered, not yet reported
        self.figures = {"batches": 0.0, "stall_s": 0.0, "in_flight": 0.0}

    def _pick(self, avoid: set[str]) -> tuple[str, TeacherClient]:
        """The next replica in turn, not in ``avoid``; waits up to ``timeout`` for one."""
        deadline = time.monotonic() + self.timeout
        while True:
            token, replicas = ray.get(self._registry.lookup.remote())
            live = sorted(set(replicas) - avoid) or sorted(replicas)
            if live:
                with self._lock:
                    name = live[self._turn % len(live)]
                    self._turn += 1
                    client = self._clients.get(name)
                    if client is None or client.address != replicas[name]:
                        client = TeacherClient(
                            replicas[name], name=name, token=token,
                            connect_timeout=self.connect_timeout,
                        )  # fmt: skip
                        self._clients[name] = client
                return name, client
            if time.monotonic() > deadline:
                raise TeacherUnavailableError(
                    f"teacher pool {self.name!r} has no replica (waited {self.timeout} s)"
                )
            time.sleep(0.1)

    def replicas(self) -> int:
        """How many replicas the pool has now."""
        _, replicas = ray.get(self._registry.lookup.remote())
        return len(replicas)

    def _forget_if_dead(self, name: str) -> None:
        """Drop replica ``name`` from the pool's registry if Ray no longer has it (killed
        for good), so no student waits on its address again; one Ray is restarting
        registers its new address itself."""
        try:
            ray.get_actor(_replica_name(name), namespace=NAMESPACE)
        except ValueError:
            ray.get(self._registry.unregister.remote(name))

    def query(
        self,
        inputs: Mapping[str, Any],
        *,
        decode: bool = True,
        read: Callable[[pa.RecordBatch], Knowledge] | None = None,
    ) -> Knowledge:
        """The knowledge for one batch of inputs, from one replica (another if it fails).
        ``read`` turns the answer into knowledge (default: ``kd.from_record_batch`` with
        ``decode``; a Student passes its teacher's, which applies a vocab_map)."""
        if read is None:
            read = functools.partial(from_record_batch, decode=decode)
        tried: set[str] = set()
        while True:
            name, client = self._pick(tried)
            try:
                out = next(query_batches(client, [inputs], 1, read))
            except TeacherUnavailableError:
                tried.add(name)
                self._forget_if_dead(name)
                if len(tried) > 16:
                    raise
                continue
            with self._lock:
                self.answered[name] = self.answered.get(name, 0) + 1
                rows = len(out[SAMPLE_ID])
                self._samples[name] = self._samples.get(name, 0) + rows
            return out

    def query_stream(
        self,
        batches: Iterable[Mapping[str, Any]],
        max_in_flight: int = 4,
        *,
        decode: bool = True,
        read: Callable[[pa.RecordBatch], Knowledge] | None = None,
    ) -> Iterator[Knowledge]:
        """Knowledge for each batch, in input order, ``max_in_flight`` queries at once,
        spread over the replicas (``decode`` and ``read`` as for :meth:`query`)."""
        depth = 0
        try:
            with ThreadPoolExecutor(max_in_flight, thread_name_prefix="kdserve-pool") as pool:
                pending: list[Future[Knowledge]] = []
                for inputs in batches:
                    pending.append(pool.submit(self.query, inputs, decode=decode, read=read))
                    if len(pending) >= max_in_flight:
                        depth += len(pending)
                        yield self._wait(pending.pop(0))
                while pending:
                    depth += len(pending)
                    yield self._wait(pending.pop(0))
        finally:
            self._report(depth)

    def _wait(self, answer: Future[Knowledge]) -> Knowledge:
        """The answer, the time waited for it counted as stall."""
        start = time.perf_counter()
        out = answer.result()
        self.figures["stall_s"] += time.perf_counter() - start
        self.figures["batches"] += 1
        return out

    def _report(self, depth: int) -> None:
        """Send this student's figures to the pool (asynchronously: never waits)."""
        with self._lock:
            samples, self._samples = self._samples, {}
        batches = self.figures["batches"]
        self.figures["in_flight"] = depth / batches if batches else 0.0
        self._registry.report.remote(self.id, samples, dict(self.figures))
