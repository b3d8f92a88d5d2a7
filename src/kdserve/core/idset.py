"""A compact set of int64 sample ids, kept as sorted disjoint runs ``[start, stop)``.

A store's sample ids are usually one contiguous range (reader positions), so the set
costs two numbers however many samples it holds; scattered ids cost two numbers per
run. Membership and insertion are vectorised over numpy arrays of ids.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["IdSet", "repeats"]

_EMPTY = np.zeros(0, np.int64)


def repeats(ids: np.ndarray) -> np.ndarray:
    """The ids that occur more than once in ``ids``, sorted (no sort when they increase,
    the usual order of a dump or a stream)."""
    if len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1])):
        return _EMPTY
    ordered = np.sort(ids)
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]])


def _runs_of(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The maximal runs of consecutive values of the sorted, unique ``ids``."""
    if len(ids) == 0:
        return _EMPTY, _EMPTY
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = ids[np.concatenate(([0], breaks))]
    stops = ids[np.concatenate((breaks - 1, [len(ids) - 1]))] + 1
    return starts, stops


class IdSet:
    """A set of int64 ids stored as sorted, disjoint, non-adjacent runs.

    ``contains`` is a binary search per id; ``add`` appends in O(new runs) when the new
    ids all lie after the current largest (the usual order of a dump), and merges the
    runs otherwise. Ids must stay below ``2**63 - 1`` (a run's stop is exclusive).
    """

    def __init__(self, ids: npt.ArrayLike = ()) -> None:
        self._starts = np.zeros(16, np.int64)  # capacity grows by doubling
        self._stops = np.zeros(16, np.int64)
        self._runs = 0
        self._size = 0
        self.add(ids)

    @classmethod
    def from_range(cls, start: int, stop: int) -> IdSet:
        """The ids ``start .. stop - 1``, as one run."""
        out = cls()
        out.add_range(start, stop)
        return out

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"IdSet({self._size} ids in {self._runs} runs)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IdSet):
            return NotImplemented
        a, b = self.runs, other.runs
        return bool(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))

    __hash__ = None  # type: ignore[assignment]  # mutable

    @property
    def runs(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the run starts and (exclusive) stops, sorted."""
        return self._starts[: self._runs].copy(), self._stops[: self._runs].copy()

    def to_array(self) -> np.ndarray:
        """Every id, sorted (materialises the runs: for tests and small sets)."""
        starts, stops = self.runs
        if len(starts) == 0:
            return np.zeros(0, np.int64)
        lengths = stops - starts
        offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
        out: np.ndarray = np.arange(self._size, dtype=np.int64) + offsets
        return out

    def contains(self, ids: npt.ArrayLike) -> np.ndarray:
        """A bool mask: which of ``ids`` are in the set."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._runs == 0:
            return np.zeros(ids.shape, bool)
        starts, stops = self._starts[: self._runs], self._stops[: self._runs]
        run = np.searchsorted(starts, ids, side="right") - 1
        mask: np.ndarray = (run >= 0) & (ids < stops[np.maximum(run, 0)])
        return mask

    def add_range(self, start: int, stop: int) -> None:
        """Add the ids ``start .. stop - 1``."""
        if stop > start:
            self._insert(np.array([start], np.int64), np.array([stop], np.int64))

    def add(self, ids: npt.ArrayLike) -> None:
        """Add ``ids`` (any order, repeats allowed)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return
        if len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):
            ids = np.unique(ids)
        self._insert(*_runs_of(ids))

    def add_new(self, ids: npt.ArrayLike) -> bool:
        """Add ``ids`` if every one is new and given once, and say so; else add nothing
        and return False. Ids that count on after the set's largest (a dump's or a
        stream's usual order) cost one vectorised comparison."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return True
        increasing = len(ids) == 1 or bool(np.all(ids[1:] > ids[:-1]))
        last = int(self._stops[self._runs - 1]) if self._runs else None
        if increasing and (last is None or int(ids[0]) >= last):
            if int(ids[-1]) - int(ids[0]) + 1 == len(ids):  # one run
                self._insert(ids[:1], ids[-1:] + 1)
            else:
                self._insert(*_runs_of(ids))
            return True
        if self.contains(ids).any() or len(repeats(ids)):
            return False
        self.add(ids)
        return True

    def _insert(self, starts: np.ndarray, stops: np.ndarray) -> None:
        """Add sorted disjoint runs (adjacent ones allowed)."""
        n = self._runs
        last = int(self._stops[n - 1]) if n else None
        if last is None or int(starts[0]) >= last:  # all after the current ids: append
            size = int(np.sum(stops - starts))
            if last is not None and int(starts[0]) == last:  # continues the last run
                self._stops[n - 1] = stops[0]
                starts, stops = starts[1:], stops[1:]
            self._reserve(n + len(starts))
            self._starts[n : n + len(starts)] = starts
            self._stops[n : n + len(stops)] = stops
            self._runs = n + len(starts)
            self._size += size
            return
        # Merge: sort every run by start, then join runs that overlap or touch.
        all_starts = np.concatenate((self._starts[:n], starts))
        all_stops = np.concatenate((self._stops[:n], stops))
        order = np.argsort(all_starts, kind="stable")
        all_starts, all_stops = all_starts[order], all_stops[order]
        reach = np.maximum.accumulate(all_stops)
        first = np.concatenate(([True], all_starts[1:] > reach[:-1]))
        merged_starts = all_starts[first]
        merged_stops = reach[np.concatenate((np.flatnonzero(first)[1:] - 1, [len(reach) - 1]))]
        self._runs = 0
        self._reserve(len(merged_starts))
        self._starts[: len(merged_starts)] = merged_starts
        self._stops[: len(merged_stops)] = merged_stops
        self._runs = len(merged_starts)
        self._size = int(np.sum(merged_stops - merged_starts))

    def _reserve(self, runs: int) -> None:
        """Grow the run buffers (by doubling) to hold at least ``runs`` runs."""
        if runs <= len(self._starts):
            return
        capacity = max(runs, 2 * len(self._starts))
        for name in ("_starts", "_stops"):
            old = getattr(self, name)
            grown = np.zeros(capacity, np.int64)
            grown[: self._runs] = old[: self._runs]
            setattr(self, name, grown)
