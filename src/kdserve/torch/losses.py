"""Distillation losses for PyTorch students: soft targets, coded top-k targets, features.

Every loss works over the *last* dimension, so the same call serves class logits
``(batch, classes)`` and token logits ``(batch, seq, vocab)``. An optional ``mask`` of
shape ``logits.shape[:-1]`` (bool, or float weights) picks the positions that count --
real tokens rather than padding -- and the loss is the (weighted) mean over them;
masked-out positions never reach the result or its gradient, whatever they hold (NaN,
out-of-range token ids such as ``-100``).

Half-precision inputs are computed in float32: log-probabilities in float16/bfloat16
lose the small differences that a KL divergence is made of. The teacher side is not
detached; a frozen teacher (``requires_grad=False``) simply receives no gradient.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 -- the conventional alias
from torch import Tensor, nn

__all__ = [
    "FeatureProjector",
    "feature_loss",
    "kd_loss",
    "sampled_token_kd_loss",
    "topk_kd_loss",
]


def kd_loss(
    student_logits: Tensor,
    teacher: Tensor,
    *,
    temperature: float = 1.0,
    teacher_is_probs: bool = False,
    mask: Tensor | None = None,
    divergence: Literal["forward", "reverse", "jsd"] = "forward",
    beta: float = 0.5,
) -> Tensor:
    """Hinton soft-target loss ``T**2 * KL(p_T || q_S)`` over the last dimension.

    ``p_T = softmax(teacher / T)`` for teacher logits; with ``teacher_is_probs`` the
    teacher holds non-negative probabilities and ``p_T = teacher**(1/T)`` renormalised
    (at ``T == 1`` exactly the given probabilities). ``q_S = softmax(student / T)``.
    The ``T**2`` factor keeps gradient magnitudes comparable across temperatures
    (Hinton et al., 2015). Returns the mean over (masked) positions of each position's
    KL, summed over classes; teacher probabilities of zero contribute nothing.

    ``divergence`` picks what is measured between ``p = p_T`` and ``q = q_S`` (still times
    ``T**2``): ``"forward"`` ``KL(p || q)`` (mode-covering, the classic), ``"reverse"``
    ``KL(q || p)`` (mode-seeking, as in MiniLLM and on-policy distillation), ``"jsd"``
    the generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024) with
    ``m = beta * p + (1 - beta) * q`` and ``beta * KL(p || m) + (1 - beta) * KL(q || m)``,
    ``0 < beta < 1`` (TRL's ``generalized_jsd_loss``, whose ``beta`` 0 and 1 are the
    forward and reverse KL: ``jsd / beta`` tends to ``KL(p || q)`` as ``beta -> 0`` and
    ``jsd / (1 - beta)`` to ``KL(q || p)`` as ``beta -> 1``, tested).
    """
    t = _check_temperature(temperature)
    b = _check_divergence(divergence, beta)
    if student_logits.shape != teacher.shape:
        raise ValueError(
            f"student_logits and teacher must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher.shape)}; check that the "
            f"teacher's knowledge matches the student's output (same classes/vocabulary)"
        )
    _need_class_dim("student_logits", student_logits)
    _check_mask(mask, student_logits.shape[:-1], "student_logits")
    work = _work_dtype(student_logits)
    z = student_logits.to(work)
    teacher_w = teacher.to(device=z.device, dtype=work)
    keep = _kept(mask, z.device)
    if keep is not None:  # padding may hold NaN: keep it out of the gradient too
        z = torch.where(keep.unsqueeze(-1), z, 0.0)
        teacher_w = torch.where(keep.unsqueeze(-1), teacher_w, 1.0)  # uniform as logits or probs
    log_q = F.log_softmax(z / t, dim=-1)
    if teacher_is_probs:
        p = teacher_w
        if t != 1.0:
            p = p ** (1.0 / t)
            p = p / p.sum(dim=-1, keepdim=True)
        log_p = torch.log(p)
    else:
        log_p = F.log_softmax(teacher_w / t, dim=-1)
        p = log_p.exp()
    per_position = _divergence(divergence, b, p, log_p, log_q).sum(dim=-1)
    return t * t * _masked_mean(per_position, mask)


def _check_divergence(kind: object, beta: object) -> float:
    """Validate ``divergence``/``beta``; return beta as a float (only ``"jsd"`` uses it)."""
    if kind not in ("forward", "reverse", "jsd"):
        raise ValueError(f"divergence must be 'forward', 'reverse' or 'jsd', got {kind!r}")
    if kind != "jsd":
        return 0.5
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 < float(beta) < 1:
        raise ValueError(
            f"beta must lie strictly between 0 and 1 for divergence='jsd', got {beta!r} "
            f"(beta 0 and 1 are divergence='forward' and 'reverse')"
        )
    return float(beta)


def _divergence(kind: str, beta: float, p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """Element-wise terms of the chosen divergence between p (teacher) and q (student),
    both distributions over the last dimension (checked by :func:`_check_divergence`)."""
    if kind == "forward":
        return _kl_terms(p, log_p, log_q)
    q = log_q.exp()
    if kind == "reverse":
        return _kl_terms(q, log_q, log_p)
    # log m = log(beta * p + (1 - beta) * q), without leaving log space
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
    return beta * _kl_terms(p, log_p, log_m) + (1 - beta) * _kl_terms(q, log_q, log_m)


def topk_kd_loss(
    student_logits: Tensor,
    values: Tensor,
    indices: Tensor,
    tail: Tensor | None = None,
    *,
    temperature: float = 1.0,
    kind: Literal["logits", "probs"] = "logits",
    mask: Tensor | None = None,
    divergence: Literal["forward", "reverse", "jsd"] = "forward",
    beta: float = 0.5,
) -> Tensor:
    """KD against a teacher coded with :class:`kdserve.TopK`, without decoding it.

    ``values``/``indices`` are the teacher's k largest entries of each position (shape
    ``(..., k)``) and ``tail`` (shape ``(...)``) its probability mass outside them -- the
    components that ``kd.from_record_batch(batch, decode=False)`` returns. The loss is
    ``T**2`` times a divergence between the teacher's k classes plus one tail bucket and
    the student's distribution collapsed the same way: its probabilities at ``indices``
    plus everything else summed into one bucket. This avoids the decoded form's invented
    spread of the tail over the other classes and costs O(k) memory for the teacher
    instead of O(vocab).

    ``kind="logits"`` (values are logits, or log-probabilities: the same up to a constant),
    with ``K`` the stored classes, ``v`` their values, ``tau`` the tail mass and ``z`` the
    student's logits, the collapsed teacher ``P`` and student ``Q`` (k + 1 entries each) are::

        P_i = (1 - tau) * exp(v_i / T) / sum_{j in K} exp(v_j / T)   (i in K),   P_tail = tau
        Q_i = softmax(z / T)_i                                      (i in K),
        Q_tail = sum_{j not in K} softmax(z / T)_j

    and, with ``KL(A || B) = sum_c A_c * log(A_c / B_c)`` over the k + 1 entries
    (``0 * log 0 = 0``), ``divergence`` picks the loss as in :func:`kd_loss`::

        "forward"  T**2 * KL(P || Q)
                 = T**2 * ( sum_{i in K} P_i log(P_i / Q_i)  +  tau log(tau / Q_tail) )
        "reverse"  T**2 * KL(Q || P)
        "jsd"      T**2 * ( beta * KL(P || M) + (1 - beta) * KL(Q || M) ),
                   M = beta * P + (1 - beta) * Q,   0 < beta < 1

    (GKD's generalized JSD, TRL's ``beta``: ``jsd / beta`` tends to the forward KL as
    ``beta -> 0`` and ``jsd / (1 - beta)`` to the reverse KL as ``beta -> 1``.) The reverse
    KL is infinite at a position whose ``tau`` is 0 while the student puts mass outside
    ``K`` (``k < vocab``) -- a stored tail can round to 0 in float16; the forward KL and
    the JSD stay finite there.

    With ``tau == 0`` (k = vocab) each divergence is exactly :func:`kd_loss` with the same
    ``divergence`` at every ``T`` (tested).
    The tail was measured at ``T = 1``; for ``T != 1`` it keeps that mass (the tempered
    tail needs the teacher's full logits), the usual approximation. :func:`kd_loss` on
    *decoded* top-k knowledge is another teacher altogether: decoding spreads ``tau``
    evenly over the other classes, so the two losses differ when ``tau > 0``; prefer this
    one for top-k knowledge.
    ``kind="probs"``: ``values`` are probabilities, sharpened as ``values**(1/T)`` and
    renormalised to ``1 - tail``. With ``tail=None`` (a ``TopK(..., tail=False)`` codec)
    there is no bucket: teacher and student are both renormalised over the k classes.
    ``indices`` may be any integer dtype (uint16/int32 from numpy); they must lie in
    ``[0, vocab)`` and be distinct within a position, as the codec writes them (at
    masked-out positions they may hold anything). A top-p codec (``TopK(k, p=...)``)
    leaves slots unused at some positions: value ``-inf``, index repeating the top one;
    they count for neither side.
    """
    t = _check_temperature(temperature)
    b = _check_divergence(divergence, beta)
    if kind not in ("logits", "probs"):
        raise ValueError(f"kind must be 'logits' or 'probs' (the TopK codec's kind), got {kind!r}")
    _check_top_k_parts(student_logits, values, indices, tail)
    positions = student_logits.shape[:-1]
    k = values.shape[-1]
    _check_mask(mask, positions, "student_logits")

    work = _work_dtype(student_logits)
    device = student_logits.device
    z = student_logits.to(work)
    index = indices.to(device=device, dtype=torch.int64)
    values_w = values.to(device=device, dtype=work)
    tail_w = None if tail is None else tail.to(device=device, dtype=work)
    keep = _kept(mask, device)
    if keep is not None:  # padding may hold anything: keep it out of value and gradient
        z = torch.where(keep.unsqueeze(-1), z, 0.0)
        index = torch.where(keep.unsqueeze(-1), index, torch.arange(k, device=device))
        values_w = torch.where(keep.unsqueeze(-1), values_w, 1.0)
        tail_w = None if tail_w is None else torch.where(keep, tail_w, 0.0)
    z = z / t
    z_k = z.gather(-1, index)
    if kind == "logits":
        log_p_k = F.log_softmax(values_w / t, dim=-1)
    else:
        sharpened = values_w if t == 1.0 else values_w ** (1.0 / t)
        log_p_k = torch.log(sharpened / sharpened.sum(dim=-1, keepdim=True))

    if tail_w is None:
        log_p, log_q = log_p_k, F.log_softmax(z_k, dim=-1)
    else:
        log_z = torch.logsumexp(z, dim=-1, keepdim=True)
        # The student's mass outside the top k, as logsumexp of the other logits: 1 - sum(q_k)
        # cancels catastrophically when the tail is small. A finite fill (not -inf) keeps the
        # gradient finite when k == vocab and there are no other logits.
        rest = z.scatter(-1, index, torch.finfo(work).min)
        log_q_tail = torch.logsumexp(rest, dim=-1, keepdim=True) - log_z
        tail_1 = tail_w.unsqueeze(-1)
        log_p = torch.cat([log_p_k + torch.log1p(-tail_1), torch.log(tail_1)], dim=-1)
        log_q = torch.cat([z_k - log_z, log_q_tail], dim=-1)
    if kind == "logits":
        log_p, log_q = _drop_unused_slots(values_w, log_p, log_q)
    per_position = _divergence(divergence, b, log_p.exp(), log_p, log_q).sum(dim=-1)
    return t * t * _masked_mean(per_position, mask)


def _check_top_k_parts(
    student_logits: Tensor, values: Tensor, indices: Tensor, tail: Tensor | None
) -> None:
    """ValueError unless the TopK components fit ``student_logits`` (positions, k, dtypes)."""
    _need_class_dim("student_logits", student_logits)
    positions = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    if values.shape[:-1] != positions or values.dim() != student_logits.dim():
        raise ValueError(
            f"values must have shape {(*positions, 'k')} (student_logits' positions, then k), "
            f"got {tuple(values.shape)}; pass the TopK codec's 'values' component for the "
            f"same samples as student_logits"
        )
    k = values.shape[-1]
    if k < 1 or k > vocab:
        raise ValueError(
            f"values has k={k} entries per position, but student_logits has {vocab} classes; "
            f"k must be in 1..{vocab} (is the teacher's vocabulary larger than the student's?)"
        )
    if indices.shape != values.shape:
        raise ValueError(
            f"indices must have the same shape as values {tuple(values.shape)}, got "
            f"{tuple(indices.shape)}; pass the TopK codec's 'indices' component"
        )
    _need_integer("indices", indices, "the TopK codec's 'indices' component unchanged")
    if tail is not None and tail.shape != positions:
        raise ValueError(
            f"tail must have shape {tuple(positions)} (one mass per position), got "
            f"{tuple(tail.shape)}; pass the TopK codec's 'tail' component, or None for a "
            f"codec with tail=False"
        )


def _need_integer(name: str, x: Tensor, what: str) -> None:
    """ValueError unless ``x`` holds integers (any integer dtype: ids, indices)."""
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(
            f"{name} must be an integer tensor, got {x.dtype}; pass {what} (any integer "
            f"dtype is accepted)"
        )


def _drop_unused_slots(values: Tensor, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """Slots a top-p position left unused (value ``-inf``; their index repeats the top
    one) get no probability on either side: a finite floor rather than ``-inf``, so no
    divergence or gradient meets ``-inf - -inf``."""
    unused = torch.isneginf(values)
    if not bool(unused.any()):
        return log_p, log_q
    if log_p.shape[-1] > values.shape[-1]:  # the tail bucket is always used
        unused = torch.cat([unused, torch.zeros_like(unused[..., :1])], dim=-1)
    floor = torch.finfo(log_p.dtype).min
    return torch.where(unused, floor, log_p), torch.where(unused, floor, log_q)


def sampled_token_kd_loss(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    tokens: Tensor,
    *,
    mask: Tensor | None = None,
    estimator: Literal["k1", "k3"] = "k1",
) -> Tensor:
    """On-policy KD from one teacher log-probability per token: reverse KL on sampled tokens.

    For sequences the student generated itself: ``tokens`` (shape ``(...)``, one id per
    position) were sampled from the student's distribution ``q = softmax(student_logits)``
    and the teacher scored them, ``teacher_logprobs = log p(tokens)`` (shape ``(...)``):
    one number per token instead of a distribution -- the exchange of RL-style on-policy
    distillation (verl, slime, NeMo RL). ``tokens[..., i]`` must be the token that
    ``student_logits[..., i, :]`` predicts (for a causal LM the *next* token: shift as
    for a language-modelling loss), and ``teacher_logprobs`` aligned the same way. Both
    log-probabilities are at ``T = 1``, of the distributions the tokens were sampled from
    (pass ``student_logits / T`` if the student sampled at temperature ``T``).

    The value is the (masked) mean over positions of a per-token estimate of the reverse
    KL ``KL(q || p) = sum_v q_v log(q_v / p_v)``, with ``x`` the token::

        "k1"   log q(x) - log p(x)
        "k3"   p(x) / q(x) - 1 - log(p(x) / q(x))       (Schulman's k3)

    Both are unbiased for tokens drawn from ``q``: ``E_{x~q}[k] = KL(q || p)``, the value
    ``kd_loss(student_logits, teacher_logits, divergence="reverse")`` computes from the
    teacher's full logits (tested). ``k1`` is negative wherever the teacher likes the
    token more than the student does; ``k3`` (verl's ``"low_var_kl"``, here without its
    clamp to [-10, 10]) is never negative and has a lower variance while ``q`` and ``p``
    are close.

    The gradient, whichever ``estimator``, is the score-function (REINFORCE) estimate::

        mean over positions of  (log q(x) - log p(x)) * grad log q(x)

    unbiased for the gradient of each position's ``KL(q || p)`` with its prefix held
    fixed -- the gradient of :func:`kd_loss` with ``divergence="reverse"`` on the same
    positions, as in on-policy distillation with per-token reward ``log p - log q`` and
    no credit to earlier tokens. Differentiating an estimate as it stands would be wrong:
    ``k1``'s own gradient, ``grad log q(x)``, has expectation zero, and ``k3``'s,
    ``(1 - p/q) grad log q(x)``, estimates the gradient of the *forward* KL. No gradient
    reaches ``teacher_logprobs`` (the teacher is the reward). Tokens sampled from an
    older student make both value and gradient biased (no importance weight is applied).

    ``teacher_logprobs`` must be log-probabilities of the teacher's full (T = 1)
    distribution, not of a top-k/top-p truncated one. ``tokens`` may be any integer dtype
    and must lie in ``[0, vocab)`` where ``mask`` selects; masked-out positions may hold
    anything (``-100`` labels, NaN).
    """
    if estimator not in ("k1", "k3"):
        raise ValueError(
            f"estimator must be 'k1' (log q - log p) or 'k3' (p/q - 1 - log(p/q)), "
            f"got {estimator!r}"
        )
    _need_class_dim("student_logits", student_logits)
    positions = student_logits.shape[:-1]
    for name, x in (("teacher_logprobs", teacher_logprobs), ("tokens", tokens)):
        if x.shape != positions:
            hint = (
                f"; drop the trailing 1 with {name}.squeeze(-1)"
                if x.shape == (*positions, 1)
                else ""
            )
            raise ValueError(
                f"{name} must have shape {tuple(positions)} (student_logits' shape without "
                f"its last dimension: one entry per token), got {tuple(x.shape)}{hint}"
            )
    if not teacher_logprobs.dtype.is_floating_point:
        raise ValueError(
            f"teacher_logprobs must be a floating tensor of log-probabilities, got "
            f"{teacher_logprobs.dtype}"
        )
    _need_integer("tokens", tokens, "the sampled token ids")
    _check_mask(mask, positions, "student_logits")

    work = _work_dtype(student_logits)
    device = student_logits.device
    z = student_logits.to(work)
    index = tokens.to(device=device, dtype=torch.int64)
    log_p = teacher_logprobs.to(device=device, dtype=work)
    keep = _kept(mask, device)
    if keep is not None:  # padding may hold anything: keep it out of value and gradient
        z = torch.where(keep.unsqueeze(-1), z, 0.0)
        index = torch.where(keep, index, 0)
        log_p = torch.where(keep, log_p, 0.0)
    # log q(x) without a (..., vocab) log_softmax kept for the backward pass
    log_q = z.gather(-1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
    k1 = (log_q - log_p).detach()
    estimate = k1 if estimator == "k1" else torch.expm1(-k1) + k1  # k3, accurate near 0
    # Value: the estimate. Gradient: k1 * grad log q (the second term is 0 in value).
    surrogate = k1 * (log_q - log_q.detach())
    return _masked_mean(estimate, mask) + _masked_mean(surrogate, mask)


def feature_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    *,
    kind: Literal["mse", "cosine"] = "mse",
    projector: Callable[[Tensor], Tensor] | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Feature (hint) distillation between hidden states, over the last dimension.

    ``kind="mse"``: mean squared error over the elements of the selected positions.
    ``kind="cosine"``: mean over selected positions of ``1 - cosine similarity``, which
    ignores scale and so suits teachers whose activations are much larger. When the
    widths differ, ``projector`` (e.g. :class:`FeatureProjector`, trained with the
    student) maps the student's features to the teacher's width first.
    """
    if kind not in ("mse", "cosine"):
        raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")
    _need_class_dim("student_features", student_features)
    _need_class_dim("teacher_features", teacher_features)
    if projector is None and student_features.shape[-1] != teacher_features.shape[-1]:
        s_dim, t_dim = student_features.shape[-1], teacher_features.shape[-1]
        raise ValueError(
            f"student_features has width {s_dim} but teacher_features has width {t_dim}; "
            f"pass projector=FeatureProjector({s_dim}, {t_dim}) and train it with the student"
        )
    student = student_features if projector is None else projector(student_features)
    if student.shape != teacher_features.shape:
        what = "student_features" if projector is None else "projector(student_features)"
        raise ValueError(
            f"{what} has shape {tuple(student.shape)} but teacher_features has shape "
            f"{tuple(teacher_features.shape)}; they must agree on every dimension"
        )
    _check_mask(mask, teacher_features.shape[:-1], "teacher_features")
    work = _work_dtype(student)
    s, t = student.to(work), teacher_features.to(work)
    if kind == "mse":
        per_position = (s - t).square().mean(dim=-1)
    else:
        per_position = 1.0 - F.cosine_similarity(s, t, dim=-1)
    return _masked_mean(per_position, mask)


class FeatureProjector(nn.Linear):
    """A learnable linear map from the student's feature width to the teacher's.

    Applied over the last dimension, so ``(batch, seq, student_dim)`` becomes
    ``(batch, seq, teacher_dim)``. No bias by default: a pure linear map is the usual
    FitNets-style regressor and cannot fit the teacher by a constant offset alone; pass
    ``bias=True`` to add one. Optimise its parameters together with the student's.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        *,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        for name, dim in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise ValueError(f"{name} must be a positive int (a feature width), got {dim!r}")
        super().__init__(student_dim, teacher_dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Project ``x`` of shape ``(..., student_dim)`` to ``(..., teacher_dim)``."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"FeatureProjector expects features of width {self.in_features} in the last "
                f"dimension, got shape {tuple(x.shape)}; build it as "
                f"FeatureProjector(student_dim, teacher_dim) with the student's width"
            )
        return super().forward(x)


def _check_temperature(temperature: object) -> float:
    """Return the temperature as a float, or raise ValueError unless it is finite and > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(
            f"temperature must be a finite number > 0, got {temperature!r}; "
            f"use 1.0 for plain soft targets, typically 1-8 for distillation"
        )
    return t


def _need_class_dim(name: str, x: Tensor) -> None:
    """Raise ValueError unless ``x`` has a last dimension (classes or features) to act on."""
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(
            f"{name} needs a non-empty last dimension (classes or features), got shape "
            f"{tuple(x.shape)}"
        )


def _check_mask(mask: Tensor | None, positions: torch.Size, source: str) -> None:
    """Raise ValueError unless ``mask`` is None or a bool/real tensor of shape ``positions``."""
    if mask is None:
        return
    if mask.shape != positions:
        raise ValueError(
            f"mask must have shape {tuple(positions)} ({source}'s shape without its last "
            f"dimension: one entry per position), got {tuple(mask.shape)}"
        )
    if mask.dtype.is_complex:
        raise ValueError(f"mask must be bool or real weights, got {mask.dtype}")


def _work_dtype(x: Tensor) -> torch.dtype:
    """float32 for half-precision (or integer) inputs, float64 for float64 ones."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _kl_terms(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """Element-wise ``p * (log p - log q)``, with ``0 * log 0 = 0`` where ``p`` is 0.

    The zero is selected inside the product, so neither value nor gradient sees the
    ``inf`` that ``log p - log q`` may hold there; a NaN ``p`` stays NaN (not dropped).
    """
    return p * torch.where(p > 0, log_p - log_q, 0.0)


def _kept(mask: Tensor | None, device: torch.device) -> Tensor | None:
    """The positions that ``mask`` selects (weight != 0) as a bool tensor, or None."""
    return None if mask is None else mask.to(device=device) != 0


def _masked_mean(per_position: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``per_position`` over all positions, or weighted by ``mask`` (weights >= 0).

    Masked-out positions are selected away (not multiplied by zero), so NaN or inf in
    padding cannot leak in. With nothing selected the result is 0, not NaN.
    """
    if mask is None:
        return per_position.mean()
    weights = mask.to(device=per_position.device, dtype=per_position.dtype)
    picked = torch.where(weights != 0, per_position * weights, 0.0)
    total = weights.sum()
    return picked.sum() / total.clamp_min(torch.finfo(total.dtype).tiny)
