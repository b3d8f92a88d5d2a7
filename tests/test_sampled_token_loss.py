"""sampled_token_kd_loss: the reverse KL estimated from one teacher log-probability per
student-sampled token -- exact on hand-made inputs, exact in expectation (value and
gradient) by enumerating every token, close in a seeded Monte Carlo, and fed by a
teacher_program through a store."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import kdserve as kd
from _helpers import torch_devices
from kdserve.torch import kd_loss, sampled_token_kd_loss, teacher_program


def test_k1_is_exactly_log_q_minus_log_p_and_k3_its_formula():
    student = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.0, -1.0]]], dtype=torch.float64)
    tokens = torch.tensor([[2, 1]])
    teacher_logprobs = torch.tensor([[-0.25, -4.0]], dtype=torch.float64)
    log_q = torch.tensor(
        [
            [
                2 - math.log(1 + math.e + math.e**2),
                0 - math.log(math.e**3 + 1 + math.e**-1),
            ]
        ],
        dtype=torch.float64,
    )
    k1 = log_q - teacher_logprobs
    got = sampled_token_kd_loss(student, teacher_logprobs, tokens)
    torch.testing.assert_close(got, k1.mean(), rtol=1e-15, atol=0)
    ratio = torch.exp(teacher_logprobs - log_q)  # p(x) / q(x)
    k3 = ratio - 1 - torch.log(ratio)
    got3 = sampled_token_kd_loss(student, teacher_logprobs, tokens, estimator="k3")
    torch.testing.assert_close(got3, k3.mean(), rtol=1e-14, atol=0)
    weights = torch.tensor([[0.25, 0.75]], dtype=torch.float64)  # float mask: weighted mean
    weighted = sampled_token_kd_loss(student, teacher_logprobs, tokens, mask=weights)
    torch.testing.assert_close(weighted, (k1 * weights).sum(), rtol=1e-15, atol=0)


def _every_token(student, teacher):
    """Each position repeated once per vocabulary token, weighted by q(token): the loss is
    then E_{x~q}[.] at each position exactly, averaged over positions."""
    positions, vocab = student.shape
    student_rep = student.unsqueeze(1).expand(positions, vocab, vocab)
    tokens = torch.arange(vocab).expand(positions, vocab)
    teacher_logprobs = teacher.log_softmax(-1)  # log p(x) for x = 0..vocab-1
    q = student.detach().softmax(-1)
    return student_rep, teacher_logprobs, tokens, q


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_expectation_over_student_samples_is_the_exact_reverse_kl_value_and_gradient(
    estimator,
):
    gen = torch.Generator().manual_seed(0)
    s = (torch.randn(5, 9, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    teacher = torch.randn(5, 9, generator=gen, dtype=torch.float64) * 2
    exact = kd_loss(s, teacher, divergence="reverse")
    (exact_grad,) = torch.autograd.grad(exact, s)

    student_rep, teacher_logprobs, tokens, q = _every_token(s, teacher)
    expected = sampled_token_kd_loss(
        student_rep, teacher_logprobs, tokens, mask=q, estimator=estimator
    )
    (expected_grad,) = torch.autograd.grad(expected, s)
    torch.testing.assert_close(expected, exact, rtol=1e-12, atol=0)
    # The gradient is the score-function estimate: in expectation the reverse KL's own.
    torch.testing.assert_close(expected_grad, exact_grad, rtol=1e-10, atol=1e-14)


def test_monte_carlo_mean_approaches_the_exact_reverse_kl():
    """Tokens sampled from the student: the mean of n per-token estimates is within 5
    standard errors of KL(q || p), the standard error from the estimator's exact variance
    (|z| > 5 has probability 6e-7; the seed fixes the draw anyway)."""
    gen = torch.Generator().manual_seed(11)
    positions, vocab, n = 4, 12, 20_000
    s = torch.randn(positions, vocab, generator=gen, dtype=torch.float64)
    teacher = torch.randn(positions, vocab, generator=gen, dtype=torch.float64)
    q, log_q, log_p = s.softmax(-1), s.log_softmax(-1), teacher.log_softmax(-1)
    exact = kd_loss(s, teacher, divergence="reverse").item()
    tokens = torch.multinomial(q, n, replacement=True, generator=gen)  # (positions, n)
    student_rep = s.unsqueeze(1).expand(positions, n, vocab)
    sampled_log_p = log_p.gather(-1, tokens)
    per_token = {"k1": log_q - log_p}
    per_token["k3"] = torch.expm1(-per_token["k1"]) + per_token["k1"]
    for estimator, values in per_token.items():
        variance = (q * values.square()).sum(-1) - (q * values).sum(-1).square()
        standard_error = math.sqrt(variance.sum().item() / n) / positions
        assert 5 * standard_error < 0.1 * exact  # the test can tell a 10% error
        got = sampled_token_kd_loss(student_rep, sampled_log_p, tokens, estimator=estimator)
        assert abs(got.item() - exact) < 5 * standard_error, estimator


def test_k3_has_the_lower_variance_when_student_and_teacher_are_close():
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(3, 20, generator=gen, dtype=torch.float64)
    teacher = s + 0.1 * torch.randn(3, 20, generator=gen, dtype=torch.float64)
    q, k1 = s.softmax(-1), s.log_softmax(-1) - teacher.log_softmax(-1)
    k3 = torch.expm1(-k1) + k1
    for values in (k1, k3):  # unbiased both: the same mean
        torch.testing.assert_close((q * values).sum(-1), (q * k1).sum(-1))
    var1 = (q * k1.square()).sum(-1) - (q * k1).sum(-1).square()
    var3 = (q * k3.square()).sum(-1) - (q * k3).sum(-1).square()
    assert (var3 < var1 / 10).all()


def test_masked_padding_reaches_neither_value_nor_gradient():
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(2, 4, 7, generator=gen)
    tokens = torch.randint(0, 7, (2, 4), generator=gen)
    teacher_logprobs = -torch.rand(2, 4, generator=gen) * 3
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    bad_tokens, bad_teacher = tokens.clone(), teacher_logprobs.clone()
    bad_tokens[~mask] = -100  # the usual ignore label
    bad_teacher[~mask] = float("nan")
    for estimator in ("k1", "k3"):
        a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
        clean = sampled_token_kd_loss(a, teacher_logprobs, tokens, mask=mask, estimator=estimator)
        dirty = sampled_token_kd_loss(b, bad_teacher, bad_tokens, mask=mask, estimator=estimator)
        clean.backward()
        dirty.backward()
        assert dirty.item() == clean.item()
        assert torch.equal(b.grad, a.grad) and torch.isfinite(b.grad).all()
        assert (b.grad[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    gen = torch.Generator().manual_seed(3)
    s = (torch.randn(3, 5, 50, generator=gen) * 3).to(dtype)
    tokens = torch.randint(0, 50, (3, 5), generator=gen)
    teacher_logprobs = (-torch.rand(3, 5, generator=gen) * 5).to(dtype)
    got = sampled_token_kd_loss(s.requires_grad_(), teacher_logprobs, tokens)
    expected = sampled_token_kd_loss(s.float(), teacher_logprobs.float(), tokens)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    got.backward()
    assert s.grad is not None and s.grad.dtype == dtype and torch.isfinite(s.grad).all()


def test_bad_arguments_say_what_to_pass():
    s, lp, tok = torch.zeros(2, 3, 10), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=re.escape("squeeze(-1)")):
        sampled_token_kd_loss(s, lp.unsqueeze(-1), tok)
    with pytest.raises(ValueError, match=re.escape("teacher_logprobs must have shape (2, 3)")):
        sampled_token_kd_loss(s, torch.zeros(2, 3, 10), tok)
    with pytest.raises(ValueError, match=re.escape("tokens must have shape (2, 3)")):
        sampled_token_kd_loss(s, lp, tok[:, :2])
    with pytest.raises(ValueError, match="tokens must be an integer tensor"):
        sampled_token_kd_loss(s, lp, lp)
    with pytest.raises(ValueError, match="teacher_logprobs must be a floating tensor"):
        sampled_token_kd_loss(s, tok, tok)
    with pytest.raises(ValueError, match="estimator must be 'k1'"):
        sampled_token_kd_loss(s, lp, tok, estimator="low_var_kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape("mask must have shape (2, 3)")):
        sampled_token_kd_loss(s, lp, tok, mask=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="student_logits needs a non-empty last dimension"):
        sampled_token_kd_loss(torch.zeros(()), torch.zeros(()), torch.zeros((), dtype=torch.long))


# --- a teacher that scores the student's tokens ----------------------------------------


class _CausalLM(nn.Module):
    """A tiny causal LM: embedding, mean over the prefix, logits per position."""

    def __init__(self, seed, vocab=13, dim=8):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens):
        steps = tokens.shape[1]
        causal = torch.ones(steps, steps, device=tokens.device).tril()
        return self.out((causal / causal.sum(-1, keepdim=True)) @ self.emb(tokens))


class _NextTokenLogprobs(nn.Module):
    """The teacher's log-probability of each next token: position i scores token i + 1
    (the position that predicts it); the last position wraps around and is masked later.
    The trailing axis of 1 makes it a per-position output that teacher_program stores
    with its lengths."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, tokens):
        log_p = self.lm(tokens).log_softmax(-1)
        return log_p.gather(-1, tokens.roll(-1, dims=1).unsqueeze(-1))


@pytest.mark.parametrize("device", torch_devices())
def test_teacher_program_stores_sampled_token_logprobs_for_the_loss(tmp_path, device):
    teacher_lm, student_lm = _CausalLM(seed=1), _CausalLM(seed=2)
    program = teacher_program(
        _NextTokenLogprobs(teacher_lm),
        inputs=["tokens"],
        outputs="token_logprobs",
        devices=[device],
    )
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 13, size=n) for n in (4, 1, 6, 3, 5)]
    batches = [{"tokens": seqs[:2]}, {"tokens": seqs[2:]}]  # max lengths 4, then 6
    kd.dump(program, batches, tmp_path / "s", progress=False)

    stored = kd.from_record_batch(kd.StoreReader(tmp_path / "s").read(0, 5))["token_logprobs"]
    assert isinstance(stored, kd.Ragged) and stored.lengths.tolist() == [4, 1, 6, 3, 5]
    teacher_lm.cpu()
    for row, seq in zip(stored, seqs, strict=True):
        with torch.inference_mode():
            log_p = teacher_lm(torch.as_tensor(seq)[None])[0].log_softmax(-1)
        nxt = np.roll(seq, -1)
        expected = log_p[torch.arange(len(seq)), torch.as_tensor(nxt)].numpy()
        # A GPU's kernels round differently from the CPU's: a tolerance that fits both.
        np.testing.assert_allclose(row[: len(seq) - 1, 0], expected[:-1], rtol=1e-4, atol=1e-5)

    # The student's turn: its logits on the same tokens, the next tokens as targets, the
    # last position of each sequence (no next token) masked out.
    lengths = torch.as_tensor(stored.lengths)
    tokens = torch.as_tensor(kd.Ragged.from_list(seqs).to_padded())
    targets = tokens.roll(-1, dims=1)
    mask = torch.arange(tokens.shape[1]) < (lengths - 1)[:, None]
    teacher_logprobs = torch.as_tensor(stored.to_padded(np.nan)).squeeze(-1)
    student_logits = student_lm(tokens)
    loss = sampled_token_kd_loss(student_logits, teacher_logprobs, targets, mask=mask)
    log_q = student_logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(loss, (log_q - teacher_logprobs)[mask].mean())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student_lm.parameters())
