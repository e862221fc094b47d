"""Tests for extra_attrib._noise (Gaussian noise helpers of FusionGrad)."""

import pytest
import torch

from extra_attrib._noise import normal_like, perturb


def test_normal_like_moments_shape_dtype():
    x = torch.zeros(200, 100, dtype=torch.float64)
    z = normal_like(x, 2.0, 0.5, torch.Generator().manual_seed(0))
    assert z.shape == x.shape and z.dtype == torch.float64
    assert abs(z.mean().item() - 2.0) < 0.01 and abs(z.std().item() - 0.5) < 0.01


def test_normal_like_per_row_std_broadcasts():
    x = torch.zeros(3, 10000)
    std = torch.tensor([0.0, 1.0, 5.0]).view(3, 1)
    z = normal_like(x, 0.0, std)
    assert torch.equal(z[0], torch.zeros(10000))
    assert abs(z[1].std().item() - 1.0) < 0.05 and abs(z[2].std().item() - 5.0) < 0.25


def test_normal_like_rejects_integer_tensors():
    with pytest.raises(TypeError, match="floating point"):
        normal_like(torch.zeros(3, dtype=torch.long), 0.0, 1.0)


@pytest.mark.parametrize("additive", [True, False])
def test_perturb_never_writes_and_returns_new_tensor(additive):
    p = torch.nn.Parameter(torch.randn(5, 4))
    before = p.detach().clone()
    out = perturb(p, 1.0, 0.3, additive)
    assert out is not p and out.data_ptr() != p.data_ptr()
    assert torch.equal(p.detach(), before)
    assert not out.requires_grad and out.grad_fn is None
    assert not torch.equal(out, before)


def test_perturb_zero_std_is_exact_and_draws_nothing():
    x = torch.randn(6, 3)
    state = torch.get_rng_state()
    assert torch.equal(perturb(x, 1.0, 0.0, additive=False), x)
    assert torch.equal(perturb(x, 0.0, 0.0, additive=True), x)
    assert torch.equal(perturb(x, 0.5, 0, additive=True), x + 0.5)
    assert torch.equal(torch.get_rng_state(), state)


def test_perturb_multiplicative_and_additive_distributions():
    x = torch.full((100000,), 3.0)
    ratio = perturb(x, 1.0, 0.2, additive=False) / x
    assert abs(ratio.mean().item() - 1.0) < 0.005 and abs(ratio.std().item() - 0.2) < 0.005
    diff = perturb(x, 0.0, 0.1, additive=True) - x
    assert abs(diff.mean().item()) < 0.002 and abs(diff.std().item() - 0.1) < 0.002


def test_perturb_reproducible_with_seed_and_generator():
    x = torch.randn(4, 4)
    torch.manual_seed(5)
    a = perturb(x, 1.0, 0.2, additive=False)
    torch.manual_seed(5)
    b = perturb(x, 1.0, 0.2, additive=False)
    assert torch.equal(a, b)
    c = perturb(x, 1.0, 0.2, False, torch.Generator().manual_seed(1))
    d = perturb(x, 1.0, 0.2, False, torch.Generator().manual_seed(1))
    assert torch.equal(c, d)
