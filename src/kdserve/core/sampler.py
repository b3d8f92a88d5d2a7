"""Which rows of a stored pass a reader gets, and in which order.

A pass over ``num_rows`` rows is cut into blocks of ``block_rows`` contiguous rows. With
``shuffle``, the block order and the rows inside each block are permuted by generators
seeded from ``(seed, epoch)`` and ``(seed, epoch, block)`` -- no RNG state is stored, so
every process derives the same order. The resulting sequence is split into
``world_size * num_workers`` contiguous parts; part ``rank * num_workers + worker`` is
this reader's. With ``even="none"`` the parts have near-equal sizes, are disjoint and
together hold every row exactly once. Data-parallel ranks must all read the same number
of batches (or a collective deadlocks), so with ``even="pad"`` (like torch's
``DistributedSampler``) every part has ``ceil(num_rows / parts)`` rows, the sequence
wrapping around to its start for the last ones, and with ``even="drop"`` every part has
``floor(num_rows / parts)`` rows, the last few rows of the sequence left out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["EVEN_MODES", "Block", "Even", "Sampler"]

Even = Literal["pad", "drop", "none"]
EVEN_MODES = ("pad", "drop", "none")


@dataclass(frozen=True)
class Block:
    """Rows ``start..stop`` of the store, or, when ``rows`` is set, those rows in that order."""

    start: int
    stop: int
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return self.stop - self.start if self.rows is None else len(self.rows)


@dataclass(frozen=True)
class Sampler:
    """Shuffle and partition settings; :meth:`plan` turns them into this reader's blocks."""

    shuffle: bool = False
    seed: int = 0
    block_rows: int = 4096
    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1
    even: Even = "none"

    def __post_init__(self) -> None:
        for key in ("seed", "block_rows", "rank", "world_size", "worker", "num_workers"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{key} must be an int, got {value!r}")
        if self.even not in EVEN_MODES:
            raise ValueError(f"even must be one of {EVEN_MODES}, got {self.even!r}")
        if self.seed < 0:
            raise ValueError(
                f"seed must be an int >= 0 (numpy's generators take no negative seed), "
                f"got {self.seed}"
            )
        if self.block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {self.block_rows}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        if not 0 <= self.worker < self.num_workers:
            raise ValueError(f"worker {self.worker} is outside num_workers {self.num_workers}")

    @staticmethod
    def world_from_env() -> tuple[int, int]:
        """``(rank, world_size)`` from torchrun's RANK / WORLD_SIZE, else ``(0, 1)``."""
        try:
            return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        except ValueError:
            raise ValueError(
                f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
                f"are not integers"
            ) from None

    def plan(self, num_rows: int, epoch: int = 0) -> list[Block]:
        """This reader's blocks for pass ``epoch``, in reading order."""
        parts = self.world_size * self.num_workers
        part = self.rank * self.num_workers + self.worker
        if self.even == "none" or parts == 1:
            lo, hi = part * num_rows // parts, (part + 1) * num_rows // parts
        else:
            size = num_rows // parts if self.even == "drop" else -(-num_rows // parts)
            lo, hi = part * size, (part + 1) * size
        blocks = []
        while lo < hi:  # positions past the end wrap around to the start ("pad")
            start = lo % num_rows
            stop = min(num_rows, start + hi - lo)
            blocks += self._span(num_rows, epoch, start, stop)
            lo += stop - start
        return blocks

    def _span(self, num_rows: int, epoch: int, lo: int, hi: int) -> list[Block]:
        """The blocks of positions ``lo..hi`` of the pass's (shuffled) row sequence."""
        starts = range(0, num_rows, self.block_rows)
        order: list[int] = list(range(len(starts)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(starts)).tolist()
        blocks = []
        position = 0  # where the current block begins in the shuffled sequence
        for b in order:
            start = starts[b]
            stop = min(start + self.block_rows, num_rows)
            size = stop - start
            first, last = max(lo - position, 0), min(hi - position, size)
            position += size
            if first >= last:
                continue
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch, b])
                rows = start + rng.permutation(size)[first:last]
                blocks.append(Block(start, stop, rows))
            else:
                blocks.append(Block(start + first, start + last))
        return blocks
