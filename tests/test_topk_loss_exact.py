"""topk_kd_loss with k = vocab is kd_loss on the full logits, for every divergence, at every
temperature, with masks and half-precision inputs (issue #11: the two losses must agree
where they can); with k < vocab each divergence is its formula on the collapsed (k classes
+ tail bucket) distributions, written out in float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdserve.torch import kd_loss, topk_kd_loss

DIVERGENCES = ["forward", "reverse", "jsd"]


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    temperature=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    shape=st.sampled_from([(3, 7), (2, 5, 11), (1, 4, 3)]),
    masked=st.booleans(),
    divergence=st.sampled_from(DIVERGENCES),
    beta=st.sampled_from([0.1, 0.5, 0.9]),
)
def test_k_equal_to_vocab_is_exactly_kd_loss(
    seed, temperature, dtype, shape, masked, divergence, beta
):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=gen) * 3).to(dtype)
    teacher = (torch.randn(shape, generator=gen) * 3).to(dtype)
    mask = torch.rand(shape[:-1], generator=gen) > 0.3 if masked else None
    vocab = shape[-1]
    order = torch.argsort(torch.rand(shape, generator=gen), dim=-1)  # any order of classes
    values = teacher.gather(-1, order)
    tail = torch.zeros(shape[:-1])
    options = {"temperature": temperature, "mask": mask, "divergence": divergence, "beta": beta}
    full = kd_loss(student, teacher, **options)
    sparse = topk_kd_loss(student, values, order, tail, **options)
    assert values.shape[-1] == vocab
    torch.testing.assert_close(sparse, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_gradients_agree_too(temperature, divergence):
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(4, 9, generator=gen)
    a = torch.randn(4, 9, generator=gen, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    order = torch.arange(9).expand(4, 9)
    options = {"temperature": temperature, "divergence": divergence, "beta": 0.3}
    kd_loss(a, teacher, **options).backward()
    topk_kd_loss(b, teacher, order, torch.zeros(4), **options).backward()
    assert torch.isfinite(b.grad).all()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)


# --- k < vocab: the collapsed distributions ---------------------------------------------


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_c a log(a / b) over the last dimension, 0 log 0 = 0 (float64 reference)."""
    return torch.where(a > 0, a * (a.log() - b.log()), 0.0).sum(-1)


def _reference(p, q, divergence, beta):
    if divergence == "forward":
        return _kl(p, q)
    if divergence == "reverse":
        return _kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def _collapsed(probs, idx, with_tail):
    """``probs`` at ``idx`` plus one bucket with the rest (or renormalised over idx)."""
    picked = probs.gather(-1, idx)
    if not with_tail:
        return picked / picked.sum(-1, keepdim=True)
    return torch.cat([picked, 1 - picked.sum(-1, keepdim=True)], dim=-1)


def _case(seed=0, shape=(2, 6, 30), k=4, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=gen, dtype=torch.float64)
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    values, idx = t.log_softmax(-1).topk(k, dim=-1)  # the codec's log-probabilities
    tail = 1 - values.exp().sum(-1)
    return s, t, values, idx, tail


@pytest.mark.parametrize("with_tail", [True, False])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_each_divergence_is_its_formula_on_the_collapsed_distributions(
    divergence, temperature, with_tail
):
    s, _, values, idx, tail = _case()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    # The teacher's stored classes, tempered, keep the T = 1 tail mass (see the docstring).
    p_k = (values / temperature).softmax(-1)
    p = torch.cat([p_k * (1 - tail)[..., None], tail[..., None]], -1) if with_tail else p_k
    q = _collapsed((s / temperature).softmax(-1), idx, with_tail)
    per_position = temperature**2 * _reference(p, q, divergence, 0.3)
    expected = per_position[mask].mean()
    got = topk_kd_loss(
        s,
        values,
        idx.to(torch.int32),
        tail if with_tail else None,
        temperature=temperature,
        mask=mask,
        divergence=divergence,
        beta=0.3,
    )
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["logits", "probs"])
def test_beta_limits_are_forward_and_reverse_kl_up_to_scaling(kind):
    """JSD(beta) / beta -> KL(P || Q) as beta -> 0 and JSD(beta) / (1 - beta) -> KL(Q || P)
    as beta -> 1, for both losses. The relative error is about eps * chi2 / KL (chi2 of the
    far distribution against the near one, below 100 here) plus float64 rounding of order
    1e-16 / eps: eps = 1e-7 keeps both under 1e-5."""
    s, t, values, idx, tail = _case(seed=5, scale=1.0)
    top = values.exp() if kind == "probs" else values
    eps = 1e-7

    def both(divergence, beta=0.5):
        full = kd_loss(s, t, divergence=divergence, beta=beta)
        sparse = topk_kd_loss(s, top, idx, tail, kind=kind, divergence=divergence, beta=beta)
        return torch.stack([full, sparse])

    torch.testing.assert_close(both("jsd", eps) / eps, both("forward"), rtol=1e-5, atol=0)
    torch.testing.assert_close(both("jsd", 1 - eps) / eps, both("reverse"), rtol=1e-5, atol=0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gradients_are_finite_for_every_divergence(divergence, dtype):
    gen = torch.Generator().manual_seed(2)
    teacher = torch.randn(3, 5, 40, generator=gen) * 4
    values, idx = teacher.log_softmax(-1).topk(6, dim=-1)
    tail = 1 - values.exp().sum(-1)
    zero_tail = tail.clone()
    zero_tail[0, 0] = 0.0  # a tail rounded to 0
    student = torch.randn(3, 5, 40, generator=gen).to(dtype).requires_grad_()
    loss = topk_kd_loss(student, values.to(dtype), idx, tail, divergence=divergence)
    loss.backward()
    assert torch.isfinite(loss)
    assert student.grad is not None and torch.isfinite(student.grad).all()
    student.grad = None
    loss = topk_kd_loss(student, values.to(dtype), idx, zero_tail, divergence=divergence)
    if divergence == "reverse":  # KL(Q || P) with P_tail = 0 < Q_tail: infinite, as it is
        assert loss.item() == float("inf")
    else:  # forward and jsd stay finite, gradient too
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_padding_reaches_neither_value_nor_gradient(divergence):
    """NaN teacher values, tails and out-of-range indices at masked-out positions change
    nothing, for topk_kd_loss and for kd_loss (the gradient used to be NaN there)."""
    s, t, values, idx, tail = _case(seed=7, shape=(2, 5, 12), k=3)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    options = {"mask": mask, "divergence": divergence}
    bad_values, bad_idx, bad_tail, bad_t = values.clone(), idx.clone(), tail.clone(), t.clone()
    bad_values[0, 2:] = float("nan")
    bad_idx[0, 2:] = -100
    bad_tail[0, 2:] = float("nan")
    bad_t[0, 2:] = float("nan")
    for loss, args, bad_args in [
        (topk_kd_loss, (values, idx, tail), (bad_values, bad_idx, bad_tail)),
        (kd_loss, (t,), (bad_t,)),
    ]:
        a = s.clone().requires_grad_()
        b = s.clone().requires_grad_()
        clean = loss(a, *args, **options)
        dirty = loss(b, *bad_args, **options)
        clean.backward()
        dirty.backward()
        assert dirty.item() == clean.item()
        assert torch.equal(b.grad, a.grad)


def test_nan_teacher_at_a_selected_position_is_not_silently_dropped():
    teacher = torch.randn(2, 4)
    teacher[1, 0] = float("nan")
    assert torch.isnan(kd_loss(torch.randn(2, 4), teacher))


def test_divergence_options_are_checked():
    s, v, i = torch.zeros(2, 5), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="divergence must be 'forward', 'reverse' or 'jsd'"):
        topk_kd_loss(s, v, i, divergence="js")  # type: ignore[arg-type]
    for beta in (0.0, 1.0, -0.5, True, "0.5"):
        with pytest.raises(ValueError, match="beta must lie strictly between 0 and 1"):
            topk_kd_loss(s, v, i, divergence="jsd", beta=beta)  # type: ignore[arg-type]
    topk_kd_loss(s, v, i, divergence="reverse", beta=1.0)  # beta only matters for jsd


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_top_p_slots_left_unused_count_for_neither_side(divergence, temperature):
    """A top-p position that keeps c < k entries gives the loss of top-c at that
    position: its unused slots (value -inf, index repeating the top one) add nothing."""
    import numpy as np

    import kdserve as kd

    gen = torch.Generator().manual_seed(7)
    teacher = torch.randn(6, 40, generator=gen) * 3
    codec = kd.TopK(12, p=0.7, min_k=2)
    parts = codec.to_compact(codec.encode(teacher.numpy(), "logits"))
    counts = np.isfinite(parts["values"]).sum(-1)
    assert len(set(counts.tolist())) > 1  # positions keep different numbers of entries
    student = (torch.randn(6, 40, generator=gen) * 2).requires_grad_()
    options = {"temperature": temperature, "divergence": divergence}
    values, indices, tail = (torch.from_numpy(parts[n]) for n in ("values", "indices", "tail"))
    got = topk_kd_loss(student, values, indices, tail, **options)
    expected = torch.stack(
        [
            topk_kd_loss(
                student[r : r + 1],
                values[r : r + 1, :c],
                indices[r : r + 1, :c],
                tail[r : r + 1],
                **options,
            )
            for r, c in enumerate(counts.tolist())
        ]
    ).mean()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    got.backward()
    assert torch.isfinite(student.grad).all()
