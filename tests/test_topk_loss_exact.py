"""topk_kd_loss with k = vocab is kd_loss on the full logits, at every temperature, with
masks and half-precision inputs (issue #11: the two losses must agree where they can)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdserve.torch import kd_loss, topk_kd_loss


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    temperature=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    shape=st.sampled_from([(3, 7), (2, 5, 11), (1, 4, 3)]),
    masked=st.booleans(),
)
def test_k_equal_to_vocab_is_exactly_kd_loss(seed, temperature, dtype, shape, masked):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=gen) * 3).to(dtype)
    teacher = (torch.randn(shape, generator=gen) * 3).to(dtype)
    mask = torch.rand(shape[:-1], generator=gen) > 0.3 if masked else None
    vocab = shape[-1]
    order = torch.argsort(torch.rand(shape, generator=gen), dim=-1)  # any order of classes
    values = teacher.gather(-1, order)
    tail = torch.zeros(shape[:-1])
    full = kd_loss(student, teacher, temperature=temperature, mask=mask)
    sparse = topk_kd_loss(student, values, order, tail, temperature=temperature, mask=mask)
    assert values.shape[-1] == vocab
    torch.testing.assert_close(sparse, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_gradients_agree_too(temperature):
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(4, 9, generator=gen)
    a = torch.randn(4, 9, generator=gen, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    order = torch.arange(9).expand(4, 9)
    kd_loss(a, teacher, temperature=temperature).backward()
    topk_kd_loss(b, teacher, order, torch.zeros(4), temperature=temperature).backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
