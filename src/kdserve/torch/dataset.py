"""A PyTorch ``IterableDataset`` over kdserve teachers, for ``DataLoader`` workers and DDP.

::

    dataset = KnowledgeDataset(["knowledge/teacher_a", "127.0.0.1:8470"], batch_size=32,
                               merge_strategy={"logits": "mean"})
    loader = DataLoader(dataset, batch_size=None, num_workers=2)   # batches come ready-made
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for batch in loader:          # dict[str, Tensor], incl. "sample_id"
            ...

Every iteration reads one pass (the dataset's epoch) with a fresh
:class:`~kdserve.student.Student`. The pass is split over ``world_size`` ranks times the
loader's ``num_workers``: worker ``w`` of rank ``r`` reads part ``r * num_workers + w``
of ``world_size * num_workers``, so the ranks' workers together read every sample once.

Fixed-shape fields become tensors that share memory with kdserve's (read-only) Arrow
buffers -- no copy. **Do not modify these tensors in place**; ``.clone()`` one first, or
move it to a device (which copies). A sequence field ``name`` becomes a zero-padded
``(batch, max_len, ...)`` tensor ``name`` and an int64 tensor ``name_lengths``.

``state_dict()``/``load_state_dict()`` let torchdata's ``StatefulDataLoader`` resume in
the middle of a pass of offline teachers (stores are read deterministically); a state
records what decides which samples its batches held, and a dataset that would skip
others refuses it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kdserve.core.batch import Knowledge
from kdserve.core.merge import StrategySpec
from kdserve.core.ragged import Ragged
from kdserve.core.sampler import Even, Sampler
from kdserve.core.wait import seconds
from kdserve.online.address import split_address
from kdserve.store.manifest import read_manifest
from kdserve.student import Student
from kdserve.student.vocab_map import VocabMap

__all__ = ["KnowledgeDataset", "to_tensors"]

# torch.from_numpy warns about every read-only array; kdserve's arrays are read-only views
# of Arrow memory by design, and the tensors are documented as not to be modified.
_READ_ONLY_WARNING = r"The given NumPy array is not writable"
_STATE_KEYS = ("epoch", "batches")
_PLAN = "plan"  # the state's record of what decides which samples a pass's batches hold


def to_tensors(batch: Knowledge, pin_memory: bool = False) -> dict[str, torch.Tensor]:
    """A kdserve batch as tensors: arrays are wrapped without copying (where torch can:
    native byte order, non-negative strides), a :class:`Ragged` field ``name`` becomes a
    zero-padded tensor ``name`` plus an int64 ``name_lengths`` and a bool ``name_mask``
    (true at real positions: padding is never mistaken for data, even where 0 is a real
    token id). A coded field read with ``decode=False`` gives one tensor per component,
    ``name_values``, ``name_indices``, ``name_tail`` for :class:`~kdserve.TopK`; indices
    come as int64, what ``gather`` and indexing take (stored as uint16 or int32, which few
    torch ops accept). The wrapped tensors share read-only memory: do not modify them in
    place."""
    out: dict[str, torch.Tensor] = {}
    for name, value in batch.items():
        parts = value if isinstance(value, dict) else {"": value}
        for part, piece in parts.items():
            key = f"{name}_{part}" if part else name
            _add_tensor(out, batch, key, piece, name)
            if part == "indices":
                out[key] = out[key].to(torch.int64)
    if pin_memory:
        out = {name: t.pin_memory() for name, t in out.items()}
    return out


def _add_tensor(
    out: dict[str, torch.Tensor], batch: Knowledge, key: str, value: Any, field: str
) -> None:
    """``value`` under ``key`` (a Ragged padded, with ``<field>_lengths``/``_mask``)."""
    if isinstance(value, Ragged):
        extra = {f"{field}_lengths", f"{field}_mask"}
        taken = sorted(extra & set(batch))
        if taken:
            raise ValueError(
                f"field {field!r} is a sequence field, whose lengths and mask go to "
                f"{sorted(extra)}, but the batch already has field(s) {taken}"
            )
        out[key] = torch.from_numpy(value.to_padded())  # a fresh, writable copy
        lengths = torch.from_numpy(value.lengths.astype(np.int64, copy=False))
        out[f"{field}_lengths"] = lengths
        steps = torch.arange(out[key].shape[1] if out[key].dim() > 1 else 0)
        out[f"{field}_mask"] = steps < lengths[:, None]
    elif isinstance(value, np.ndarray):
        out[key] = _wrap(value)
    else:
        raise TypeError(
            f"field {field!r} holds a {type(value).__name__}; expected an ndarray or a Ragged"
        )


def _wrap(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_READ_ONLY_WARNING, category=UserWarning)
        try:
            return torch.from_numpy(array)
        except (TypeError, ValueError):  # negative strides, non-native byte order
            return torch.from_numpy(
                np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
            )


class KnowledgeDataset(IterableDataset[dict[str, torch.Tensor]]):
    """Batches of merged knowledge from ``teachers`` (store directories and/or online
    teachers' ``"host:port"`` addresses), as dicts of tensors.

    Use it with ``DataLoader(dataset, batch_size=None, ...)``: the dataset already
    batches (``batch_size``, ``drop_last``). ``merge_strategy``, ``shuffle``, ``seed``,
    ``block_rows``, ``token``, ``connect_timeout`` and ``stall_timeout`` are the
    :class:`Student`'s;
    ``rank``/``world_size`` default to torchrun's RANK/WORLD_SIZE; ``even_ranks`` (the
    :class:`Student`'s, ``"pad"`` by default) gives every rank the same number of
    batches per pass, whatever its loader's workers. The shuffle order of
    a pass derives from ``(seed, epoch)`` only, so every rank and worker agrees on it;
    call :meth:`set_epoch` before each epoch, like ``DistributedSampler``.
    ``decode=False`` keeps coded fields compact (see :func:`to_tensors`: for top-k
    knowledge ``name_values``, ``name_indices``, ``name_tail``, for ``topk_kd_loss``).
    ``expect`` is the :class:`Student`'s (the provenance every teacher must record), and
    ``vocab_maps`` gives teachers, keyed as in ``teachers``, a :class:`~kdserve.VocabMap`
    into the student's vocabulary. ``allow_incomplete`` reads stores whose dump has not
    finished (the samples in their complete shards).
    ``pin_memory`` pins the tensors (which copies them) on a background thread of the
    main process, ready for ``.to(device, non_blocking=True)``; in ``DataLoader`` workers
    pinning is left to ``DataLoader(pin_memory=True)``, which pins in the main process
    (pinning inside a worker process fails on CUDA). Tensors are made, and merging,
    re-batching and decoding done, on the student's prefetch thread, off the training
    loop's.
    """

    def __init__(
        self,
        teachers: Sequence[str | os.PathLike[str]],
        *,
        batch_size: int,
        merge_strategy: Mapping[str, StrategySpec] | None = None,
        drop_last: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        block_rows: int = 4096,
        pin_memory: bool = False,
        decode: bool = True,
        token: str | None = None,
        connect_timeout: float = 60.0,
        stall_timeout: float | None = 600.0,
        rank: int | None = None,
        world_size: int | None = None,
        even_ranks: Even = "pad",
        expect: Mapping[str, Any] | None = None,
        vocab_maps: Mapping[str | os.PathLike[str], VocabMap] | None = None,
        allow_incomplete: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(teachers, (str, os.PathLike)):
            teachers = [teachers]
        if not teachers:
            raise ValueError("KnowledgeDataset needs at least one teacher")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        # Per teacher: the Student method that registers it, and its path or address.
        self._teachers: list[tuple[str, str]] = []
        for t in teachers:
            where = os.fspath(t)
            if os.path.isdir(where):
                self._teachers.append(("add_store", where))
            elif split_address(where) is not None:
                self._teachers.append(("add_teacher", where))
            else:
                raise ValueError(
                    f"teacher {where!r} is neither an existing store directory nor an online "
                    f"teacher's address 'host:port'"
                )
        given = {os.fspath(k): v for k, v in (vocab_maps or {}).items()}
        unknown = sorted(set(given) - {where for _, where in self._teachers})
        if unknown:
            raise ValueError(
                f"vocab_maps names {unknown}, which are not among the teachers "
                f"{[where for _, where in self._teachers]}; key each map by its teacher as given"
            )
        self.vocab_maps = given
        self.expect = dict(expect or {})
        self.allow_incomplete = bool(allow_incomplete)
        env_rank, env_world = Sampler.world_from_env()
        self.rank = env_rank if rank is None else rank
        self.world_size = env_world if world_size is None else world_size
        # The Student's checks of these, now rather than in each loader worker.
        Sampler(shuffle, seed, block_rows, self.rank, self.world_size, even=even_ranks)
        self.even_ranks = even_ranks
        self.batch_size = batch_size
        self.merge_strategy = dict(merge_strategy or {})
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.seed = seed
        self.block_rows = block_rows
        if pin_memory and not torch.accelerator.is_available():
            warnings.warn(
                "KnowledgeDataset(pin_memory=True): no accelerator is available, so tensors "
                "are not pinned (as torch's DataLoader does)",
                stacklevel=2,
            )
            pin_memory = False
        self.pin_memory = pin_memory
        self.decode = decode
        self.token = token
        self.connect_timeout = seconds("connect_timeout", connect_timeout)
        self.stall_timeout = (
            None if stall_timeout is None else seconds("stall_timeout", stall_timeout)
        )
        self._epoch = 0
        self._batches = 0  # batches yielded in this epoch by this instance
        self._resume = 0  # batches the next iteration skips (set by load_state_dict)

    @property
    def epoch(self) -> int:
        """The pass the next iteration reads."""
        return self._epoch

    @property
    def online(self) -> bool:
        """Whether any teacher is an online teacher."""
        return any(add == "add_teacher" for add, _ in self._teachers)

    def set_epoch(self, epoch: int) -> None:
        """Read pass ``epoch`` from now on (a new epoch starts from its first batch)."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = 0
            self._resume = 0

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch": ..., "batches": ..., "plan": {...}}``: the pass, the batches this
        instance (in a loader worker: this worker) has yielded of it, and what decides
        which samples they held (batch size, order, the teachers' stores), which
        :meth:`load_state_dict` checks before skipping them."""
        return {"epoch": self._epoch, "batches": self._batches, _PLAN: self._plan()}

    @functools.cached_property
    def _stores(self) -> list[list[Any] | None]:
        """Each store by when it was created, its rows and its shards' checksums in order
        (a store rewritten, grown or repaired and re-run reads in another order), not by
        its path: a job may resume where stores mount elsewhere. Read once: a stateful
        loader asks for the state at every batch."""
        stores: list[list[Any] | None] = []
        for add, where in self._teachers:
            if add == "add_store":
                manifest = read_manifest(Path(where))
                shards = [[s.get("crc32"), s.get("rows")] for s in manifest.get("shards", [])]
                order = hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]
                stores.append([manifest.get("created"), manifest.get("rows"), order])
            else:
                stores.append(None)  # online: read from a pass's start only
        return stores

    def _plan(self) -> dict[str, Any]:
        """What decides which samples the first batches of a pass hold, for this worker."""
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        return {
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "block_rows": self.block_rows,
            "part": [self.rank * workers + worker, self.world_size * workers],
            "teachers": self._stores,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next iteration reads pass ``epoch`` and
        skips its first ``batches`` batches. Mid-pass resume needs offline teachers only."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        unknown = sorted(set(state) - {*_STATE_KEYS, _PLAN}, key=str)
        missing = [k for k in _STATE_KEYS if k not in state]
        if unknown or missing:
            raise ValueError(
                f"not a KnowledgeDataset state: unknown key(s) {unknown}, missing key(s) "
                f"{missing}; expected {list(_STATE_KEYS)} and {_PLAN!r}"
            )
        for key in _STATE_KEYS:
            value = state[key]
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"state[{key!r}] must be an int >= 0, got {value!r}")
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches and self.online:
            raise ValueError(
                f"cannot resume in the middle of pass {epoch} ({batches} batches read): online "
                f"teachers have already served them and cannot replay a pass in part. Resume "
                f"at the start of an epoch instead"
            )
        if batches:
            self._check_plan(state.get(_PLAN), epoch, batches)
        self._epoch = epoch
        self._batches = batches
        self._resume = batches

    def _check_plan(self, saved: Any, epoch: int, batches: int) -> None:
        """ValueError unless skipping ``batches`` now skips the samples they held then."""
        if saved is None:
            warnings.warn(
                f"resuming pass {epoch} after {batches} batches from a state without its "
                f"'{_PLAN}' (an older kdserve): it cannot be checked that this dataset's "
                f"batch size, order and stores are the ones it was saved with",
                stacklevel=3,
            )
            return
        now = self._plan()
        if not isinstance(saved, Mapping):
            raise ValueError(f"state[{_PLAN!r}] must be a mapping, got {type(saved).__name__}")
        for key, value in now.items():
            was = saved.get(key)
            if key == "teachers" and was != value and was == _without_order(value):
                warnings.warn(  # a state of a kdserve before stores' shard order was kept
                    f"resuming pass {epoch} after {batches} batches from a state that names "
                    f"its stores without their shards' order (an older kdserve): a store "
                    f"repaired and re-run since cannot be told apart",
                    stacklevel=3,
                )
                continue
            if was != value:
                raise ValueError(
                    f"cannot resume pass {epoch} after {batches} batches: the state was saved "
                    f"with {key}={was!r}, this dataset has {key}={value!r}, so the batches "
                    f"skipped would not be the ones read and samples would be lost or read "
                    f"twice. Resume with the same settings, stores and loader workers, or "
                    f"at the start of an epoch (batches=0)"
                )

    def _student(self, rank: int, world_size: int) -> Student:
        student = Student(
            self.merge_strategy,
            shuffle=self.shuffle,
            seed=self.seed,
            block_rows=self.block_rows,
            rank=rank,
            world_size=world_size,
            # Loader workers of one process need no padding: only ranks run collectives.
            even_ranks=self.even_ranks if self.world_size > 1 else "none",
            token=self.token,
            connect_timeout=self.connect_timeout,
            stall_timeout=self.stall_timeout,
            expect=self.expect,
        )
        try:
            for add, where in self._teachers:
                vocab_map = self.vocab_maps.get(where)
                if add == "add_store":
                    student.add_store(
                        where, allow_incomplete=self.allow_incomplete, vocab_map=vocab_map
                    )
                else:
                    student.add_teacher(where, vocab_map=vocab_map)
            student.start()
        except BaseException:
            student.close()
            raise
        return student

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        skip, self._resume = self._resume, 0
        self._batches = skip
        epoch = self._epoch
        student = self._student(self.rank * workers + worker, self.world_size * workers)
        # Tensors are made (and pinned) on the student's prefetch thread, off the training
        # loop's. Pinning happens in the main process only, as torch's DataLoader does it:
        # in a loader worker it is left to DataLoader(pin_memory=True).
        convert = functools.partial(to_tensors, pin_memory=self.pin_memory and info is None)
        try:
            loader = student.loader(
                self.batch_size, self.drop_last, epoch=epoch, decode=self.decode, transform=convert
            )
            for i, tensors in enumerate(loader):
                if i < skip:  # read before a resume: offline teachers repeat them exactly
                    continue
                self._batches += 1  # before yielding: a state taken now counts this batch
                yield tensors
        finally:
            student.close()


def _without_order(stores: Any) -> Any:
    """A plan's stores as older states name them: [created, rows], no shards' order."""
    if not isinstance(stores, list):
        return stores
    return [s[:2] if isinstance(s, list) else s for s in stores]
