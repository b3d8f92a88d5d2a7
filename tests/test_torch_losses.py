"""kdserve.torch losses, each checked against its formula written out in float64 numpy."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import Tensor

import kdserve as kd
from kdserve.torch import FeatureProjector, feature_loss, kd_loss, topk_kd_loss

RTOL = 1e-5
ATOL = 1e-6


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """sum_c p log(p / q) over the last axis, with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return np.asarray(terms.sum(axis=-1))


def masked_mean(per_position: np.ndarray, mask: np.ndarray | None) -> float:
    if mask is None:
        return float(per_position.mean())
    w = mask.astype(np.float64)
    return float((per_position * w).sum() / w.sum())


def t64(x: np.ndarray) -> Tensor:
    return torch.tensor(x, dtype=torch.float64)


def t32(x: np.ndarray) -> Tensor:
    return torch.tensor(x, dtype=torch.float32)


def top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of the last axis (descending) and their indices."""
    idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(x, idx, axis=-1), idx


def collapsed_kl(
    p_full: np.ndarray, q_full: np.ndarray, idx: np.ndarray, with_tail: bool
) -> np.ndarray:
    """KL between two distributions collapsed onto classes ``idx`` (+ one tail bucket)."""
    p_k = np.take_along_axis(p_full, idx, axis=-1)
    q_k = np.take_along_axis(q_full, idx, axis=-1)
    if not with_tail:
        return kl(p_k / p_k.sum(-1, keepdims=True), q_k / q_k.sum(-1, keepdims=True))
    p_tail = 1.0 - p_k.sum(-1)
    q_tail = 1.0 - q_k.sum(-1)
    return kl(p_k, q_k) + np.where(p_tail > 0, p_tail * np.log(p_tail / q_tail), 0.0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# --- kd_loss ---------------------------------------------------------------------------


def test_kd_loss_class_logits_matches_formula(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(6, 10)), rng.normal(size=(6, 10)) * 2
    expected = kl(softmax(t), softmax(s)).mean()
    assert kd_loss(t64(s), t64(t)).item() == pytest.approx(expected, rel=1e-12)
    assert kd_loss(t32(s), t32(t)).item() == pytest.approx(expected, rel=RTOL)


def test_kd_loss_token_logits_mask_ignores_padding(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(3, 7, 13)), rng.normal(size=(3, 7, 13)) * 3
    mask = np.ones((3, 7), dtype=bool)
    mask[0, 5:] = False
    mask[2, 2:] = False
    expected = masked_mean(kl(softmax(t), softmax(s)), mask)
    loss = kd_loss(t32(s), t32(t), mask=torch.tensor(mask))
    assert loss.item() == pytest.approx(expected, rel=RTOL)

    # Whatever the padded positions hold (NaN included), the loss is the same.
    s2, t2 = s.copy(), t.copy()
    s2[~mask] = rng.normal(size=s2[~mask].shape) * 100
    t2[~mask] = np.nan
    assert kd_loss(t32(s2), t32(t2), mask=torch.tensor(mask)).item() == loss.item()
    # A float mask of 0/1 is the same selection; other weights give a weighted mean.
    assert kd_loss(t32(s), t32(t), mask=t32(mask)).item() == pytest.approx(loss.item())
    weights = rng.uniform(0.1, 2.0, size=(3, 7))
    expected_w = masked_mean(kl(softmax(t), softmax(s)), weights)
    got_w = kd_loss(t64(s), t64(t), mask=t64(weights)).item()
    assert got_w == pytest.approx(expected_w, rel=1e-12)


def test_kd_loss_with_nothing_selected_is_zero(rng: np.random.Generator) -> None:
    s, t = t32(rng.normal(size=(2, 3, 5))), t32(rng.normal(size=(2, 3, 5)))
    assert kd_loss(s, t, mask=torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("temperature", [2.0, 4.0, 0.5])
def test_kd_loss_temperature_squared_factor(rng: np.random.Generator, temperature: float) -> None:
    s, t = rng.normal(size=(4, 9, 17)), rng.normal(size=(4, 9, 17)) * 2
    expected = temperature**2 * kl(softmax(t / temperature), softmax(s / temperature)).mean()
    got = kd_loss(t32(s), t32(t), temperature=temperature).item()
    assert got == pytest.approx(expected, rel=RTOL)


def test_kd_loss_teacher_probs(rng: np.random.Generator) -> None:
    s = rng.normal(size=(5, 8))
    p = softmax(rng.normal(size=(5, 8)) * 2)
    p[:, :2] = 0.0  # zero teacher mass: 0 log 0 = 0
    p /= p.sum(-1, keepdims=True)
    got = kd_loss(t64(s), t64(p), teacher_is_probs=True).item()
    assert got == pytest.approx(kl(p, softmax(s)).mean(), rel=1e-12)

    sharp = p**0.5
    sharp /= sharp.sum(-1, keepdims=True)
    expected_t2 = 4 * kl(sharp, softmax(s / 2)).mean()
    got_t2 = kd_loss(t64(s), t64(p), teacher_is_probs=True, temperature=2.0).item()
    assert got_t2 == pytest.approx(expected_t2, rel=1e-12)
    # Teacher logits and the same teacher as probabilities give the same loss.
    logits = rng.normal(size=(5, 8))
    for temperature in (1.0, 3.0):
        from_logits = kd_loss(t64(s), t64(logits), temperature=temperature)
        from_probs = kd_loss(
            t64(s), t64(softmax(logits)), teacher_is_probs=True, temperature=temperature
        )
        assert from_probs.item() == pytest.approx(from_logits.item(), rel=1e-10)


def test_kd_loss_zero_when_equal_and_gradient_reaches_student_only(
    rng: np.random.Generator,
) -> None:
    x = rng.normal(size=(2, 4, 6))
    student = t64(x).requires_grad_()
    teacher = t64(x)
    loss = kd_loss(student, teacher, temperature=2.0)
    assert abs(loss.item()) < 1e-12
    loss.backward()
    assert student.grad is not None
    assert torch.count_nonzero(student.grad.abs() > 1e-12) == 0
    assert teacher.grad is None

    # d/ds T^2 KL(p || softmax(s/T)) = T (q - p), averaged over the 8 positions.
    teacher = t64(rng.normal(size=(2, 4, 6)))
    student = t64(x).requires_grad_()
    kd_loss(student, teacher, temperature=3.0).backward()
    expected = 3.0 * (softmax(x / 3) - softmax(teacher.numpy() / 3)) / 8
    assert student.grad is not None
    np.testing.assert_allclose(student.grad.numpy(), expected, rtol=1e-10, atol=1e-14)


def test_kd_loss_half_precision_is_computed_in_float32(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(4, 50)), rng.normal(size=(4, 50))
    got = kd_loss(torch.tensor(s, dtype=torch.bfloat16), torch.tensor(t, dtype=torch.bfloat16))
    assert got.dtype == torch.float32
    s_bf = torch.tensor(s, dtype=torch.bfloat16).double().numpy()
    t_bf = torch.tensor(t, dtype=torch.bfloat16).double().numpy()
    assert got.item() == pytest.approx(kl(softmax(t_bf), softmax(s_bf)).mean(), rel=RTOL)


# --- topk_kd_loss ----------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_full_k_equals_kd_loss(rng: np.random.Generator, temperature: float) -> None:
    s, t = rng.normal(size=(3, 5, 12)), rng.normal(size=(3, 5, 12)) * 2
    values, idx = top_k(t, 12)
    full = kd_loss(t32(s), t32(t), temperature=temperature)
    coded = topk_kd_loss(
        t32(s),
        t32(values),
        torch.tensor(idx.astype(np.uint16)),
        torch.zeros(3, 5),
        temperature=temperature,
    )
    assert coded.item() == pytest.approx(full.item(), rel=RTOL, abs=ATOL)
    no_tail = topk_kd_loss(t32(s), t32(values), torch.tensor(idx), temperature=temperature)
    assert no_tail.item() == pytest.approx(full.item(), rel=RTOL, abs=ATOL)


def test_topk_full_k_gradient_is_finite(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
    values, idx = top_k(t, 6)
    student = t32(s).requires_grad_()
    topk_kd_loss(student, t32(values), torch.tensor(idx), torch.zeros(2)).backward()
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()


def test_topk_logits_matches_collapsed_formula(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(2, 6, 30)), rng.normal(size=(2, 6, 30)) * 3
    values, idx = top_k(t, 4)
    p = softmax(t)
    tail = 1.0 - np.take_along_axis(p, idx, axis=-1).sum(-1)
    mask = np.ones((2, 6), dtype=bool)
    mask[1, 3:] = False
    expected = masked_mean(collapsed_kl(p, softmax(s), idx, with_tail=True), mask)
    got = topk_kd_loss(
        t32(s),
        t32(values),
        torch.tensor(idx.astype(np.int32)),
        t32(tail),
        mask=torch.tensor(mask),
    )
    assert got.item() == pytest.approx(expected, rel=RTOL)


def test_topk_temperature_uses_tempered_top_k_and_kept_tail(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(4, 20)), rng.normal(size=(4, 20)) * 3
    values, idx = top_k(t, 5)
    tail = 1.0 - np.take_along_axis(softmax(t), idx, axis=-1).sum(-1)
    p_k = softmax(values / 2) * (1 - tail)[:, None]
    q = softmax(s / 2)
    q_k = np.take_along_axis(q, idx, axis=-1)
    expected = 4 * (kl(p_k, q_k) + tail * np.log(tail / (1 - q_k.sum(-1)))).mean()
    got = topk_kd_loss(t64(s), t64(values), torch.tensor(idx), t64(tail), temperature=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_topk_without_tail_renormalises_both_sides(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(3, 4, 25)), rng.normal(size=(3, 4, 25)) * 2
    values, idx = top_k(t, 6)
    expected = collapsed_kl(softmax(t), softmax(s), idx, with_tail=False).mean()
    got = topk_kd_loss(t32(s), t32(values), torch.tensor(idx.astype(np.uint16)))
    assert got.item() == pytest.approx(expected, rel=RTOL)


def test_topk_probs_kind(rng: np.random.Generator) -> None:
    s, p = rng.normal(size=(5, 16)), softmax(rng.normal(size=(5, 16)) * 2)
    values, idx = top_k(p, 3)
    tail = 1.0 - values.sum(-1)
    expected = collapsed_kl(p, softmax(s), idx, with_tail=True).mean()
    got = topk_kd_loss(t64(s), t64(values), torch.tensor(idx), t64(tail), kind="probs")
    assert got.item() == pytest.approx(expected, rel=1e-10)
    # kind="probs" and kind="logits" describe the same teacher.
    logit_values = np.take_along_axis(np.log(p), idx, axis=-1)
    as_logits = topk_kd_loss(t64(s), t64(logit_values), torch.tensor(idx), t64(tail))
    assert as_logits.item() == pytest.approx(expected, rel=1e-10)


def test_topk_mask_ignores_padding(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(2, 5, 10)), rng.normal(size=(2, 5, 10))
    values, idx = top_k(t, 3)
    tail = 1.0 - np.take_along_axis(softmax(t), idx, axis=-1).sum(-1)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    loss = topk_kd_loss(t32(s), t32(values), torch.tensor(idx), t32(tail), mask=mask)
    s2, values2, tail2 = s.copy(), values.copy(), tail.copy()
    s2[0, 2:] = 50.0
    values2[0, 2:] = np.nan
    tail2[0, 2:] = 0.9
    loss2 = topk_kd_loss(t32(s2), t32(values2), torch.tensor(idx), t32(tail2), mask=mask)
    assert loss2.item() == loss.item()


@pytest.mark.parametrize("tail", [True, False])
def test_topk_end_to_end_through_kdserve_codec(rng: np.random.Generator, tail: bool) -> None:
    n, seq, vocab, k = 3, 4, 40, 6
    teacher = (rng.normal(size=(n, seq, vocab)) * 3).astype(np.float32)
    student = rng.normal(size=(n, seq, vocab)).astype(np.float32)
    schema = kd.Schema(
        [kd.Field("logits", "float32", (seq, vocab), codec=kd.TopK(k, kind="logits", tail=tail))]
    )
    batch = kd.to_record_batch({"logits": teacher}, schema, sample_ids=np.arange(n))
    parts = kd.from_record_batch(batch, decode=False)["logits"]
    assert parts["indices"].dtype == np.uint16
    values = torch.tensor(np.array(parts["values"]))
    indices = torch.tensor(np.array(parts["indices"]))
    tail_t = torch.tensor(np.array(parts["tail"])) if tail else None
    mask = np.ones((n, seq), dtype=bool)
    mask[2, 1:] = False

    _, idx = top_k(teacher.astype(np.float64), k)
    expected = masked_mean(collapsed_kl(softmax(teacher), softmax(student), idx, tail), mask)
    got = topk_kd_loss(t32(student), values, indices, tail_t, mask=torch.tensor(mask))
    assert got.item() == pytest.approx(expected, rel=1e-4)


# --- feature_loss ----------------------------------------------------------------------


def test_feature_mse_matches_formula_with_mask(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(3, 5, 8)), rng.normal(size=(3, 5, 8))
    assert feature_loss(t64(s), t64(t)).item() == pytest.approx(((s - t) ** 2).mean(), rel=1e-12)
    mask = np.zeros((3, 5), dtype=bool)
    mask[0, :2] = mask[2, :] = True
    expected = ((s - t) ** 2)[mask].mean()
    got = feature_loss(t64(s), t64(t), mask=torch.tensor(mask))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    s[~mask] = np.inf
    assert feature_loss(t64(s), t64(t), mask=torch.tensor(mask)).item() == got.item()


def test_feature_cosine_matches_formula_with_mask(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(2, 6, 16)), rng.normal(size=(2, 6, 16)) * 10
    cos = (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
    mask = np.ones((2, 6), dtype=bool)
    mask[1, 4:] = False
    got = feature_loss(t32(s), t32(t), kind="cosine", mask=torch.tensor(mask))
    assert got.item() == pytest.approx((1 - cos)[mask].mean(), rel=RTOL)
    same = feature_loss(t32(t), t32(t * 3), kind="cosine")
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_feature_projector_maps_width_and_trains(rng: np.random.Generator) -> None:
    torch.manual_seed(0)
    projector = FeatureProjector(8, 16)
    assert projector.bias is None
    s, t = rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 3, 16))
    student = t32(s).requires_grad_()
    loss = feature_loss(student, t32(t), projector=projector)
    w = projector.weight.detach().double().numpy()
    assert loss.item() == pytest.approx(((s @ w.T - t) ** 2).mean(), rel=RTOL)
    loss.backward()
    assert projector.weight.grad is not None
    assert projector.weight.grad.abs().sum() > 0
    assert student.grad is not None
    assert FeatureProjector(8, 16, bias=True).bias is not None


def test_feature_width_mismatch_names_the_projector(rng: np.random.Generator) -> None:
    s, t = t32(rng.normal(size=(2, 8))), t32(rng.normal(size=(2, 16)))
    with pytest.raises(ValueError, match=re.escape("projector=FeatureProjector(8, 16)")):
        feature_loss(s, t)
    with pytest.raises(ValueError, match="width 8 in the last dimension"):
        feature_loss(t32(rng.normal(size=(2, 4))), t, projector=FeatureProjector(8, 16))
    with pytest.raises(ValueError, match=re.escape("projector(student_features) has shape")):
        feature_loss(s, t32(rng.normal(size=(3, 16))), projector=FeatureProjector(8, 16))


# --- argument errors -------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), "2", True])
def test_bad_temperature(temperature: object) -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(x, x, temperature=temperature)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        topk_kd_loss(x, x[:, :1], torch.zeros(2, 1, dtype=torch.long), temperature=temperature)  # type: ignore[arg-type]


def test_kd_loss_bad_shapes() -> None:
    with pytest.raises(ValueError, match="student_logits and teacher must have the same shape"):
        kd_loss(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError, match=re.escape("mask must have shape (2, 3)")):
        kd_loss(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="student_logits needs a non-empty last dimension"):
        kd_loss(torch.zeros(()), torch.zeros(()))


def test_topk_bad_arguments() -> None:
    s = torch.zeros(2, 3, 10)
    v, i, tail = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="values must have shape"):
        topk_kd_loss(s, torch.zeros(2, 4), i[:, 0], tail)
    with pytest.raises(ValueError, match=re.escape("k must be in 1..10")):
        topk_kd_loss(s, torch.zeros(2, 3, 11), torch.zeros(2, 3, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="indices must have the same shape"):
        topk_kd_loss(s, v, i[..., :2], tail)
    with pytest.raises(ValueError, match="indices must be an integer tensor"):
        topk_kd_loss(s, v, v, tail)
    with pytest.raises(ValueError, match=re.escape("tail must have shape (2, 3)")):
        topk_kd_loss(s, v, i, torch.zeros(2))
    with pytest.raises(ValueError, match="kind must be 'logits' or 'probs'"):
        topk_kd_loss(s, v, i, tail, kind="soft")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask must have shape"):
        topk_kd_loss(s, v, i, tail, mask=torch.ones(2, dtype=torch.bool))


def test_feature_bad_arguments() -> None:
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="kind must be 'mse' or 'cosine'"):
        feature_loss(x, x, kind="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="teacher_features has shape"):
        feature_loss(x, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="mask must have shape"):
        feature_loss(x, x, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="student_dim must be a positive int"):
        FeatureProjector(0, 4)
    with pytest.raises(ValueError, match="teacher_dim must be a positive int"):
        FeatureProjector(4, 2.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_reverse_kl_and_generalized_jsd_match_their_formulas(temperature):
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    teacher = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    p = torch.softmax(teacher / temperature, -1)
    q = torch.softmax(student / temperature, -1)
    t2 = temperature**2

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1).mean()

    reverse = kd_loss(student, teacher, temperature=temperature, divergence="reverse")
    torch.testing.assert_close(reverse, t2 * kl(q, p))
    for beta in (0.1, 0.5, 0.9):
        m = beta * p + (1 - beta) * q
        jsd = kd_loss(student, teacher, temperature=temperature, divergence="jsd", beta=beta)
        torch.testing.assert_close(jsd, t2 * (beta * kl(p, m) + (1 - beta) * kl(q, m)))
    same = kd_loss(teacher, teacher, divergence="jsd")
    torch.testing.assert_close(same, torch.zeros((), dtype=torch.float64))


def test_divergence_options_are_checked():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="divergence must be 'forward', 'reverse' or 'jsd'"):
        kd_loss(x, x, divergence="js")
    with pytest.raises(ValueError, match="beta must lie strictly between 0 and 1"):
        kd_loss(x, x, divergence="jsd", beta=1.0)
