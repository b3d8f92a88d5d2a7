"""Distillation losses for PyTorch students: soft targets, coded top-k targets, features.

Every loss works over the *last* dimension, so the same call serves class logits
``(batch, classes)`` and token logits ``(batch, seq, vocab)``. An optional ``mask`` of
shape ``logits.shape[:-1]`` (bool, or float weights) picks the positions that count --
real tokens rather than padding -- and the loss is the (weighted) mean over them;
masked-out positions never reach the result, whatever they hold.

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

__all__ = ["FeatureProjector", "feature_loss", "kd_loss", "topk_kd_loss"]


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
    forward and reverse KL).
    """
    t = _check_temperature(temperature)
    if student_logits.shape != teacher.shape:
        raise ValueError(
            f"student_logits and teacher must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher.shape)}; check that the "
            f"teacher's knowledge matches the student's output (same classes/vocabulary)"
        )
    _need_class_dim("student_logits", student_logits)
    _check_mask(mask, student_logits.shape[:-1], "student_logits")
    work = _work_dtype(student_logits)
    log_q = F.log_softmax(student_logits.to(work) / t, dim=-1)
    if teacher_is_probs:
        p = teacher.to(work)
        if t != 1.0:
            p = p ** (1.0 / t)
            p = p / p.sum(dim=-1, keepdim=True)
        log_p = torch.log(p)
    else:
        log_p = F.log_softmax(teacher.to(work) / t, dim=-1)
        p = log_p.exp()
    per_position = _divergence(divergence, beta, p, log_p, log_q).sum(dim=-1)
    return t * t * _masked_mean(per_position, mask)


def _divergence(kind: str, beta: object, p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """Element-wise terms of the chosen divergence between p (teacher) and q (student)."""
    if kind == "forward":
        return _kl_terms(p, log_p, log_q)
    q = log_q.exp()
    if kind == "reverse":
        return _kl_terms(q, log_q, log_p)
    if kind != "jsd":
        raise ValueError(f"divergence must be 'forward', 'reverse' or 'jsd', got {kind!r}")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 < float(beta) < 1:
        raise ValueError(
            f"beta must lie strictly between 0 and 1 for divergence='jsd', got {beta!r} "
            f"(beta 0 and 1 are divergence='forward' and 'reverse')"
        )
    b = float(beta)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(b), log_q + math.log(1 - b)]), dim=0)
    return b * _kl_terms(p, log_p, log_m) + (1 - b) * _kl_terms(q, log_q, log_m)


def topk_kd_loss(
    student_logits: Tensor,
    values: Tensor,
    indices: Tensor,
    tail: Tensor | None = None,
    *,
    temperature: float = 1.0,
    kind: Literal["logits", "probs"] = "logits",
    mask: Tensor | None = None,
) -> Tensor:
    """KD against a teacher coded with :class:`kdserve.TopK`, without decoding it.

    ``values``/``indices`` are the teacher's k largest entries of each position (shape
    ``(..., k)``) and ``tail`` (shape ``(...)``) its probability mass outside them -- the
    components that ``kd.from_record_batch(batch, decode=False)`` returns. The loss is
    ``T**2 * KL`` between the teacher's k classes plus one tail bucket and the student's
    distribution collapsed the same way: its probabilities at ``indices`` plus everything
    else summed into one bucket. This avoids the decoded form's invented spread of the
    tail over the other classes and costs O(k) memory for the teacher instead of O(vocab).

    ``kind="logits"`` (values are logits, or log-probabilities: the same up to a constant),
    with ``K`` the stored classes, ``v`` their values, ``tau`` the tail mass and ``z`` the
    student's logits::

        p_i   = (1 - tau) * exp(v_i / T) / sum_{j in K} exp(v_j / T)      (i in K)
        q_i   = softmax(z / T)_i,    q_tail = sum_{j not in K} softmax(z / T)_j
        loss  = T**2 * ( sum_{i in K} p_i * log(p_i / q_i)  +  tau * log(tau / q_tail) )

    With ``tau == 0`` (k = vocab) this is exactly :func:`kd_loss` at every ``T`` (tested).
    The tail was measured at ``T = 1``; for ``T != 1`` it keeps that mass (the tempered
    tail needs the teacher's full logits), the usual approximation. :func:`kd_loss` on
    *decoded* top-k knowledge is another teacher altogether: decoding spreads ``tau``
    evenly over the other classes, so the two losses differ when ``tau > 0``; prefer this
    one for top-k knowledge.
    ``kind="probs"``: ``values`` are probabilities, sharpened as ``values**(1/T)`` and
    renormalised to ``1 - tail``. With ``tail=None`` (a ``TopK(..., tail=False)`` codec)
    there is no bucket: teacher and student are both renormalised over the k classes.
    ``indices`` may be any integer dtype (uint16/int32 from numpy); they must lie in
    ``[0, vocab)`` and be distinct within a position, as the codec writes them.
    """
    t = _check_temperature(temperature)
    if kind not in ("logits", "probs"):
        raise ValueError(f"kind must be 'logits' or 'probs' (the TopK codec's kind), got {kind!r}")
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
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(
            f"indices must be an integer tensor, got {indices.dtype}; pass the TopK codec's "
            f"'indices' component unchanged (any integer dtype is accepted)"
        )
    if tail is not None and tail.shape != positions:
        raise ValueError(
            f"tail must have shape {tuple(positions)} (one mass per position), got "
            f"{tuple(tail.shape)}; pass the TopK codec's 'tail' component, or None for a "
            f"codec with tail=False"
        )
    _check_mask(mask, positions, "student_logits")

    work = _work_dtype(student_logits)
    index = indices.to(device=student_logits.device, dtype=torch.int64)
    z = student_logits.to(work) / t
    z_k = z.gather(-1, index)
    if kind == "logits":
        log_p_k = F.log_softmax(values.to(work) / t, dim=-1)
    else:
        sharpened = values.to(work) if t == 1.0 else values.to(work) ** (1.0 / t)
        log_p_k = torch.log(sharpened / sharpened.sum(dim=-1, keepdim=True))

    if tail is None:
        log_q_k = F.log_softmax(z_k, dim=-1)
        per_position = _kl_terms(log_p_k.exp(), log_p_k, log_q_k).sum(dim=-1)
        return t * t * _masked_mean(per_position, mask)

    tail_w = tail.to(device=student_logits.device, dtype=work)
    log_p_k = log_p_k + torch.log1p(-tail_w).unsqueeze(-1)
    log_z = torch.logsumexp(z, dim=-1)
    log_q_k = z_k - log_z.unsqueeze(-1)
    # The student's mass outside the top k, as logsumexp of the other logits: 1 - sum(q_k)
    # cancels catastrophically when the tail is small. A finite fill (not -inf) keeps the
    # gradient finite when k == vocab and there are no other logits.
    rest = z.scatter(-1, index, torch.finfo(work).min)
    log_q_tail = torch.logsumexp(rest, dim=-1) - log_z
    per_position = _kl_terms(log_p_k.exp(), log_p_k, log_q_k).sum(dim=-1)
    per_position = per_position + _kl_terms(tail_w, torch.log(tail_w), log_q_tail)
    return t * t * _masked_mean(per_position, mask)


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
    """Element-wise ``p * (log p - log q)``, with ``0 * log 0 = 0`` for zero teacher mass."""
    return torch.where(p > 0, p * (log_p - log_q), 0.0)


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
