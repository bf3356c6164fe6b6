from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from bnprobe.noise.functional import fixed_noise, sigma_param, sigma_param_inverse
from bnprobe.noise.modules import FixedNoise, LearnedNoise
from bnprobe.norms import ChannelAffine

DT = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_fixed_noise_stds_match_requested_sigmas():
    sv = torch.tensor([0.1, 0.5, 1.0])
    su = torch.tensor([0.2, 0.05, 0.4])
    n = 20000
    # additive part alone: y - x = V
    add = FixedNoise(3, sigma_v=sv, sigma_u=0.0, generator=_gen(0)).double()
    x = torch.randn(n, 3, 2, 2, generator=_gen(1), dtype=DT)
    d = (add(x) - x)[:, :, 0, 0]
    torch.testing.assert_close(d.std(dim=0), sv.double(), rtol=0.03, atol=0)
    torch.testing.assert_close(d.mean(dim=0), torch.zeros(3, dtype=DT), atol=0.02, rtol=0)
    # multiplicative part alone: y / x = U ~ N(1, su^2)
    mul = FixedNoise(3, sigma_v=0.0, sigma_u=su, generator=_gen(2)).double()
    ones = torch.ones(n, 3, 2, 2, dtype=DT)
    r = mul(ones)[:, :, 0, 0]
    torch.testing.assert_close(r.std(dim=0), su.double(), rtol=0.03, atol=0)
    torch.testing.assert_close(r.mean(dim=0), torch.ones(3, dtype=DT), atol=0.01, rtol=0)
    # both, with a per-layer value and noise_scale: y = (0 + V) U has var sv^2 (1 + su^2)
    both = FixedNoise(3, sigma_v=0.5, sigma_u=0.5, noise_scale=2.0, generator=_gen(3)).double()
    y = both(torch.zeros(n, 3, 1, 1, dtype=DT))[:, :, 0, 0]
    torch.testing.assert_close(y.var(dim=0), torch.full((3,), 2.0, dtype=DT), rtol=0.05, atol=0)


def test_fixed_noise_is_shared_over_spatial_positions():
    g = _gen(4)
    x = torch.rand(6, 4, 5, 7, generator=g, dtype=DT) + 0.5
    d = (FixedNoise(4, 0.3, 0.0, generator=_gen(5)).double()(x) - x).reshape(6, 4, -1)
    assert (d.std(dim=2) < 1e-12).all() and (d[:, :, 0].abs() > 0).all()
    r = (FixedNoise(4, 0.0, 0.3, generator=_gen(6)).double()(x) / x).reshape(6, 4, -1)
    assert (r.std(dim=2) < 1e-12).all() and ((r[:, :, 0] - 1).abs() > 0).all()
    # different samples and channels get different draws
    assert d[:, :, 0].flatten().unique().numel() == 24


def test_fixed_noise_eval_identity_mc_and_reproducible():
    x = torch.randn(3, 2, 4, 4, generator=_gen(7))
    noise = FixedNoise(2, 0.5, 0.5)
    noise.eval()
    assert noise(x) is x
    noise.mc = True
    assert not torch.allclose(noise(x), x)
    a = FixedNoise(2, 0.5, 0.5, generator=_gen(8))
    b = copy.deepcopy(a)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    c = FixedNoise(2, 0.5, 0.5, generator=_gen(9))
    assert not torch.allclose(a(x), c(x))
    # the global RNG is not touched when a generator is given
    state = torch.get_rng_state()
    a(x)
    assert torch.equal(state, torch.get_rng_state())
    # noise_scale = 0 switches it off even in training mode
    off = FixedNoise(2, 0.5, 0.5, noise_scale=0.0)
    torch.testing.assert_close(off(x), x, rtol=0, atol=0)
    with pytest.raises(ValueError):
        FixedNoise(3, sigma_v=[0.1, 0.2])


def test_fixed_noise_matches_formula():
    x = torch.randn(4, 3, 2, 2, generator=_gen(10), dtype=DT)
    y = fixed_noise(x, 0.3, torch.tensor([0.1, 0.2, 0.3], dtype=DT), generator=_gen(11))
    g = _gen(11)
    v = torch.randn(4, 3, 1, 1, generator=g, dtype=DT) * 0.3
    u = 1 + torch.randn(4, 3, 1, 1, generator=g, dtype=DT) * torch.tensor(
        [0.1, 0.2, 0.3], dtype=DT
    ).reshape(1, 3, 1, 1)
    torch.testing.assert_close(y, (x + v) * u)
    flat = fixed_noise(torch.zeros(5, 3), 1.0, 0.0, generator=_gen(12))  # (N, C) input
    assert flat.shape == (5, 3) and flat.abs().min() > 0
    assert fixed_noise(x, 0.3, 0.3, training=False) is x  # the eval-mode map is the identity


def test_sigma_param_values_and_derivatives():
    u = torch.tensor([-30.0, -3.0, -1e-6, 0.0, 1e-6, 2.0, 1e3], dtype=DT, requires_grad=True)
    s = sigma_param(u)
    expected = torch.tensor(
        [math.exp(-30.0), math.exp(-3.0), math.exp(-1e-6), 1.0, 1 + 1e-6, 3.0, 1001.0], dtype=DT
    )
    torch.testing.assert_close(s.detach(), expected, rtol=1e-12, atol=0)
    s.sum().backward()
    d = u.grad
    torch.testing.assert_close(d[:3], torch.exp(u.detach()[:3]))
    torch.testing.assert_close(d[3:], torch.ones(4, dtype=DT))
    assert (d <= 1).all() and torch.isfinite(d).all()
    # continuous at 0 from both sides (value and slope)
    assert abs(s[2].item() - s[4].item()) < 3e-6 and abs(d[2].item() - d[4].item()) < 3e-6
    # huge u does not produce inf/nan gradients through the unused exp branch
    big = torch.tensor([800.0], requires_grad=True)
    sigma_param(big).backward()
    assert big.grad.item() == 1.0


def test_sigma_param_inverse_round_trip():
    sig = torch.tensor([1e-4, 0.05, 0.999, 1.0, 2.5], dtype=DT)
    torch.testing.assert_close(sigma_param(sigma_param_inverse(sig)), sig)
    assert sigma_param_inverse(0.05) == pytest.approx(torch.log(torch.tensor(0.05)).item())
    assert sigma_param_inverse(3.0) == 2.0
    with pytest.raises(ValueError):
        sigma_param_inverse(0.0)


def test_learned_noise_kl_matches_torch_distributions():
    ln = LearnedNoise(5, init_sigma=0.3, prior_std=4.0).double()
    with torch.no_grad():
        ln.scale.copy_(torch.tensor([0.5, 1.0, 1.5, -2.0, 3.0]))
        ln.u.copy_(torch.tensor([-2.0, -0.1, 0.0, 0.5, 1.5]))
    ref = kl_divergence(Normal(ln.scale, ln.sigma()), Normal(1.0, 4.0)).sum()
    kl = ln.kl()
    assert kl.dim() == 0
    torch.testing.assert_close(kl, ref)
    kl.backward()
    torch.testing.assert_close(ln.scale.grad, (ln.scale.detach() - 1) / 16)
    assert ln.u.grad.abs().min() > 0
    layer = LearnedNoise(4, init_sigma=0.2, per_channel=False, prior_std=10.0)
    assert layer.u.shape == (1,)
    torch.testing.assert_close(layer.sigma(), torch.tensor([0.2]))
    ref = kl_divergence(Normal(layer.scale, layer.sigma().expand(4)), Normal(1.0, 10.0)).sum()
    torch.testing.assert_close(layer.kl(), ref)


def test_learned_noise_forward_modes():
    ln = LearnedNoise(3, init_sigma=0.25, generator=_gen(13)).double()
    torch.testing.assert_close(ln.sigma(), torch.full((3,), 0.25, dtype=DT))
    with torch.no_grad():
        ln.scale.copy_(torch.tensor([0.5, 1.0, 2.0]))
        ln.bias.copy_(torch.tensor([1.0, -1.0, 0.5]))
    torch.testing.assert_close(  # geometric mean of sigma / |s| = 0.5, 0.25, 0.125
        ln.relative_sigma(), torch.tensor(0.25, dtype=DT)
    )
    x = torch.randn(4, 3, 2, 2, generator=_gen(14), dtype=DT)
    mean_map = (x + ln.bias.detach().reshape(1, 3, 1, 1)) * ln.scale.detach().reshape(1, 3, 1, 1)
    ln.eval()
    torch.testing.assert_close(ln(x), mean_map)
    torch.testing.assert_close(ln(x), ln(x), rtol=0, atol=0)
    ln.mc = True
    assert not torch.allclose(ln(x), mean_map)
    ln.mc = False
    ln.train()
    # S = y / (x + b) ~ N(s, sigma^2), constant over space
    n = 20000
    ones = torch.zeros(n, 3, 1, 2, dtype=DT) + (1 - ln.bias.detach()).reshape(1, 3, 1, 1)
    y = ln(ones)
    assert (y[..., 0] == y[..., 1]).all()
    s = y[:, :, 0, 0].detach()
    torch.testing.assert_close(s.mean(dim=0), ln.scale.detach(), atol=0.01, rtol=0)
    torch.testing.assert_close(s.std(dim=0), ln.sigma().detach(), rtol=0.03, atol=0)
    y.square().mean().backward()
    assert ln.u.grad.abs().min() > 0  # reparametrized draws give gradients to sigma
    m, v = ln.propagate(torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT))
    torch.testing.assert_close(m, torch.tensor([0.5, -1.0, 1.0], dtype=DT))
    torch.testing.assert_close(v, torch.tensor([0.25, 1.0, 4.0], dtype=DT))


def test_channel_affine():
    aff = ChannelAffine(2)
    with torch.no_grad():
        aff.scale.copy_(torch.tensor([2.0, 3.0]))
        aff.bias.copy_(torch.tensor([1.0, -1.0]))
    x = torch.ones(1, 2, 2, 2)
    torch.testing.assert_close(aff(x)[0, :, 0, 0], torch.tensor([3.0, 2.0]))
    m, v = aff.propagate(torch.zeros(2), torch.ones(2))
    torch.testing.assert_close(m, torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(v, torch.tensor([4.0, 9.0]))
