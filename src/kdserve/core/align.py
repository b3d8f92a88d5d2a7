"""Alignment by sample id: teachers are matched by the ids of their samples, never by
arrival order. One lookup serves every place that aligns (merging batches, looking up a
store's rows for an online teacher's batch, matching two stores)."""

from __future__ import annotations

import numpy as np

__all__ = ["first_difference", "rows_of"]


def rows_of(
    ids: np.ndarray, wanted: np.ndarray, order: np.ndarray | None = None
) -> np.ndarray | None:
    """The rows of ``ids`` that hold ``wanted``, in ``wanted``'s order; None when some
    wanted id is not in ``ids``. ``order`` is ``np.argsort(ids, kind="stable")``, for
    callers that look up the same ids many times."""
    if len(ids) == 0:
        return np.zeros(0, np.int64) if len(wanted) == 0 else None
    if order is None:
        order = np.argsort(ids, kind="stable")
    rows = order[np.clip(np.searchsorted(ids, wanted, sorter=order), 0, len(ids) - 1)]
    return rows if np.array_equal(ids[rows], wanted) else None


def first_difference(a: np.ndarray, b: np.ndarray) -> int:
    """The first row where two id arrays differ (the shorter length if one is a prefix)."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n
