"""Student: registers teachers, merges their knowledge by sample id, yields re-batched passes.

Pantheon's calls keep their names and meaning::

    student = Student(merge_strategy={"logits": "mean"})
    student.register_teacher(in_path="knowledge/teacher_a")
    student.register_teacher(in_path="knowledge/teacher_b")
    student.start()
    desc = student.get_knowledge_desc()
    reader = student.get_knowledge_generator(batch_size=32)
    for epoch in range(3):
        for batch in reader():       # each call is one more pass
            ...                      # dict[str, ndarray], incl. "sample_id"

The first registered teacher sets the order of a pass; other teachers' rows are
matched to it by sample id (positionally when their ids are in the same order, through
an id index otherwise). Teachers that do not hold the same samples are refused at
``start()`` with an :class:`~kdserve.errors.AlignmentError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from kdserve.batch import Knowledge, from_record_batch
from kdserve.errors import AlignmentError, KdserveError, StoreError
from kdserve.merge import Merger, StrategySpec
from kdserve.prefetch import Prefetcher
from kdserve.rebatch import rebatch
from kdserve.sampler import Block, Sampler
from kdserve.store import StoreReader

__all__ = ["Student"]


class _OfflineTeacher:
    """A registered store and how its rows map onto the reference teacher's rows."""

    def __init__(self, name: str, path: str, allow_incomplete: bool) -> None:
        self.name = name
        self.path = path
        self.reader = StoreReader(path)
        if not self.reader.complete and not allow_incomplete:
            raise StoreError(
                f"store {path} (teacher {name!r}) is incomplete: its dump is still running or "
                f"was interrupted ({len(self.reader)} samples in complete shards). Re-run the "
                f"dump to finish it, or register_teacher(..., allow_incomplete=True)",
                path=path,
            )
        self.rows_of: np.ndarray | None = None  # reference row -> this store's row; None: same

    def align_to(self, reference: _OfflineTeacher) -> None:
        ref_ids, ids = reference.reader.sample_ids(), self.reader.sample_ids()
        if np.array_equal(ref_ids, ids):
            return
        order = np.argsort(ids, kind="stable")
        pos = np.clip(np.searchsorted(ids, ref_ids, sorter=order), 0, max(len(ids) - 1, 0))
        found = (
            len(ids) == len(ref_ids) and len(ids) > 0 and np.array_equal(ids[order[pos]], ref_ids)
        )
        if not found or len(np.unique(ref_ids)) != len(ref_ids):
            missing = np.setdiff1d(ref_ids, ids)
            extra = np.setdiff1d(ids, ref_ids)
            a = int(missing[0]) if len(missing) else None
            b = int(extra[0]) if len(extra) else None
            raise AlignmentError(
                f"teachers {reference.name!r} ({len(ref_ids)} samples) and {self.name!r} "
                f"({len(ids)} samples) do not hold the same samples: first id only in "
                f"{reference.name!r}: {a}, first id only in {self.name!r}: {b}. Dump both "
                f"teachers over the same data",
                teachers=(reference.name, self.name),
                sample_ids=(a, b),
            )
        self.rows_of = order[pos]

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


class Student:
    """Merges registered teachers' knowledge and yields it in the student's batch size.

    ``merge_strategy`` maps a field that several teachers produce to ``"sum"``,
    ``"mean"``, ``"max"``, ``"min"``, a :class:`~kdserve.merge.MergeStrategy` or a
    callable. ``shuffle``/``seed`` give each pass a deterministic block-shuffled order
    (a new one per pass); ``rank``/``world_size`` (default: torchrun's RANK/WORLD_SIZE)
    give this process a disjoint share of every pass.
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
        buf_size: int = 8,
    ) -> None:
        env_rank, env_world = Sampler.world_from_env()
        self._sampler = Sampler(
            shuffle=shuffle,
            seed=seed,
            block_rows=block_rows,
            rank=env_rank if rank is None else rank,
            world_size=env_world if world_size is None else world_size,
        )
        self.merge_strategy = dict(merge_strategy or {})
        self.buf_size = buf_size
        self._registered: list[tuple[str, str, bool]] = []
        self._teachers: list[_OfflineTeacher] = []
        self._merger: Merger | None = None
        self._epoch = 0
        self._prefetcher: Prefetcher[Knowledge] | None = None

    def register_teacher(
        self,
        in_path: str | os.PathLike[str] | None = None,
        in_address: str | None = None,
        *,
        name: str | None = None,
        allow_incomplete: bool = False,
    ) -> int:
        """Register an offline teacher (a store at ``in_path``); returns its teacher id."""
        if self._merger is not None:
            raise KdserveError("register every teacher before start()")
        if in_address is not None:
            raise KdserveError(
                f"online teachers (in_address={in_address!r}) are not available in this "
                f"version of kdserve yet; dump the teacher to a store and use in_path="
            )
        if in_path is None:
            raise KdserveError("register_teacher needs in_path= (a knowledge store directory)")
        path = os.fspath(in_path)
        teacher_name = name or f"{len(self._registered)}:{os.path.basename(os.path.normpath(path))}"
        if any(n == teacher_name for n, _, _ in self._registered):
            raise KdserveError(f"a teacher named {teacher_name!r} is already registered")
        self._registered.append((teacher_name, path, allow_incomplete))
        return len(self._registered) - 1

    def start(self) -> None:
        """Open every teacher, check their knowledge fits together and holds the same samples."""
        if self._merger is not None:
            return
        if not self._registered:
            raise KdserveError("register at least one teacher before start()")
        teachers = [_OfflineTeacher(n, p, a) for n, p, a in self._registered]
        for t in teachers[1:]:
            t.align_to(teachers[0])
        self._merger = Merger({t.name: t.reader.schema for t in teachers}, self.merge_strategy)
        self._teachers = teachers

    def _started(self) -> Merger:
        if self._merger is None:
            raise KdserveError("call start() before reading knowledge")
        return self._merger

    def get_knowledge_desc(self) -> dict[str, dict[str, Any]]:
        """The merged knowledge: ``{field: {"shape", "dtype", "lod_level"}}`` (Pantheon style)."""
        return self._started().schema.describe()

    def get_knowledge_qsize(self) -> int:
        """Merged batches prefetched and waiting for the consumer."""
        return self._prefetcher.qsize() if self._prefetcher else 0

    def __len__(self) -> int:
        """Samples in one pass for this rank."""
        self._started()
        return sum(len(b) for b in self._sampler.plan(len(self._teachers[0].reader)))

    def get_knowledge_generator(
        self, batch_size: int, drop_last: bool = False
    ) -> Callable[[], Iterator[Knowledge]]:
        """A callable; each call yields one more pass of merged batches of ``batch_size``."""
        merger = self._started()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")

        def one_pass() -> Iterator[Knowledge]:
            epoch = self._epoch
            self._epoch += 1
            blocks = self._sampler.plan(len(self._teachers[0].reader), epoch)

            def produce() -> Iterator[Knowledge]:
                streams = [
                    rebatch(t.batches(blocks), batch_size, drop_last) for t in self._teachers
                ]
                for batches in zip(*streams, strict=True):
                    yield merger.merge(
                        {
                            t.name: from_record_batch(b, t.reader.schema)
                            for t, b in zip(self._teachers, batches, strict=True)
                        }
                    )

            self._prefetcher = Prefetcher(produce, self.buf_size, name="kdserve-student")
            yield from self._prefetcher

        return one_pass
