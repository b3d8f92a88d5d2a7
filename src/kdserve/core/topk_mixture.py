"""Mixtures of top-k teachers: what ``Mean``/``WeightedMean`` make of a field coded with TopK.

Each teacher ``t`` gives every position a distribution ``p_t`` over the ``V`` classes,
the one :meth:`TopK.decode <kdserve.core.codecs.TopK.decode>` expands to: its k stored
classes get ``softmax(values) * (1 - tail)`` (kind ``"logits"``: values are logits or
log-probabilities, up to a constant per position) or ``values`` (kind ``"probs"``), and
its ``V - k`` other classes share ``tail`` evenly. Without a tail (``tail=False``, or
``k == V``) the other classes get 0: a logits teacher is then its k classes
renormalised, a probs teacher its k probabilities as they are. The merged distribution
is the mixture ``q = sum_t w_t p_t`` (``w_t``: the weights over the teachers, summing to
one; equal for ``Mean``).

Decoded (``decode=True``), the merge is ``q`` itself: ``log q`` for logits (not the mean
of the decoded logits, which would be their normalised geometric mean), ``q`` for probs;
teachers may differ in k and tail there. Compact (``decode=False``, every teacher with
the same k, kind and tail), it is what that codec would store for ``q``: the k most
probable classes of ``q`` over all ``V`` (``indices``), their ``log q`` or ``q``
(``values``, descending; ties to the lower class) and ``q``'s mass outside them
(``tail``, when the codec keeps one). It needs only the union ``U`` of the teachers'
stored classes: a class outside ``U`` has ``q = F = sum_t w_t tail_t / (V - k)``, and a
class of ``U`` has ``F`` plus, for each teacher that stores it, ``w_t`` times (its stored
probability minus its share of that teacher's tail). An encoded teacher never stores a
class less probable than those it drops, so ``F`` can at most tie with ``U`` (up to
rounding), and ties go to ``U``. Components written by hand may carry a larger tail:
then classes outside ``U`` can win, and the lowest-numbered ones take those places, each
with ``F``. Log-probabilities are floored at ``log`` of float64's smallest normal (-708).
A top-p codec's teachers leave slots unused (their other classes are ``V`` minus those
they keep); the mixture then keeps its own nucleus, as that codec would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kdserve.core.codecs import TopK

__all__ = ["mix_compact", "mix_dense"]

_FLOOR = np.finfo(np.float64).tiny  # probabilities below it are logged as if they were it


def mix_dense(values: Sequence[np.ndarray], weights: Sequence[float], kind: str) -> np.ndarray:
    """The mixture of decoded rows (one array per teacher), as logits or probabilities."""
    if kind == "probs":
        return np.asarray(
            sum(w * v.astype(np.float64) for w, v in zip(weights, values, strict=True))
        )
    mixture = np.asarray(sum(w * _softmax(v) for w, v in zip(weights, values, strict=True)))
    out: np.ndarray = np.log(np.maximum(mixture, _FLOOR))
    return out


def mix_compact(
    codec: TopK,
    width: int,
    parts: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    dtype: np.dtype[Any],
) -> dict[str, np.ndarray]:
    """The top-k components of the teachers' mixture, from theirs (shape ``(..., k)``, all
    from ``codec`` over ``width`` classes); ``values`` in ``dtype``."""
    k = codec.k
    lead = parts[0]["values"].shape[:-1]
    n = int(np.prod(lead))
    shares = [_stored_and_share(codec, width, p, n) for p in parts]
    # F, the probability of a class that no teacher stores
    fill = np.asarray(sum(w * share for w, (_, share) in zip(weights, shares, strict=True)))
    # Each stored class's gain over F, then summed per class: the union's probabilities.
    classes = np.concatenate([p["indices"].reshape(n, k).astype(np.int64) for p in parts], 1)
    gain = np.concatenate(
        [w * (top - share[:, None]) for w, (top, share) in zip(weights, shares, strict=True)], 1
    )
    by_class = np.argsort(classes, axis=1)
    classes = np.take_along_axis(classes, by_class, 1)
    gain = np.take_along_axis(gain, by_class, 1)
    first = np.ones(classes.shape, dtype=bool)  # the first entry of each class in its row
    first[:, 1:] = classes[:, 1:] != classes[:, :-1]
    run = np.cumsum(first.reshape(-1)) - 1
    starts = np.flatnonzero(first)
    q = np.full(classes.shape, -np.inf)  # repeats of a class stay at -inf
    totals = np.bincount(run, weights=gain.reshape(-1), minlength=len(starts))
    q.reshape(-1)[starts] = fill[starts // classes.shape[1]] + totals
    # Classes outside the union win the places where F beats the union (never on a tie).
    union = first.sum(axis=1)
    beats = np.maximum(k - (first & (q >= fill[:, None])).sum(axis=1), 0)
    outside = np.minimum(beats, width - union)
    order = np.argsort(-q, axis=1, kind="stable")
    ranked = np.take_along_axis(q, order, 1)
    kept = np.arange(classes.shape[1]) < (k - outside)[:, None]
    prob = ranked[:, :k]
    index = np.take_along_axis(classes, order[:, :k], 1)
    slots = ~kept[:, :k]
    if slots.any():
        rows = np.flatnonzero(outside)
        members = np.sort(np.where(first, classes, np.iinfo(np.int64).max)[rows], axis=1)
        missing = _missing(members, int(outside.max()))
        nth = np.maximum(np.arange(k) - (k - outside[rows])[:, None], 0)
        index[rows] = np.where(
            slots[rows], missing[np.arange(len(rows))[:, None], nth], index[rows]
        )
        prob = np.where(slots, fill[:, None], prob)
        resort = np.argsort(-prob, axis=1, kind="stable")
        prob = np.take_along_axis(prob, resort, 1)
        index = np.take_along_axis(index, resort, 1)
    values = prob if codec.kind == "probs" else np.log(np.maximum(prob, _FLOOR))
    out = {
        "values": values.reshape(*lead, k).astype(dtype),
        "indices": index.reshape(*lead, k).astype(np.result_type(*(p["indices"] for p in parts))),
    }
    if codec.tail:
        dropped = np.where(~kept & np.isfinite(ranked), ranked, 0.0).sum(axis=1)
        tail = dropped + fill * (width - union - outside)
        out["tail"] = tail.reshape(lead).astype(np.float32)
    return codec.top_p(out) if codec.p is not None else out


def _stored_and_share(
    codec: TopK, width: int, parts: Mapping[str, np.ndarray], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """A teacher's probabilities of its k stored classes ``(n, k)`` and of any other ``(n,)``."""
    values = parts["values"].reshape(n, codec.k).astype(np.float64)
    used = ~np.isneginf(values)  # top-p leaves slots unused: -inf, the top class's index
    rest = width - used.sum(axis=1)
    tail = np.zeros(n)
    if codec.tail:
        tail = np.where(rest > 0, parts["tail"].reshape(n).astype(np.float64), 0.0)
    share = tail / np.maximum(rest, 1)
    if codec.kind == "probs":
        return values, share
    # An unused slot gains nothing over the share: it adds 0 to the class it repeats.
    return np.where(used, _softmax(values) * (1 - tail)[:, None], share[:, None]), share


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


def _missing(members: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` smallest classes absent from each row of ``members`` (sorted, distinct,
    padded with a huge value): the j-th is j plus the members below it."""
    below = members - np.arange(members.shape[1])  # classes missing before each member
    return np.stack([j + (below <= j).sum(axis=1) for j in range(count)], axis=1)
