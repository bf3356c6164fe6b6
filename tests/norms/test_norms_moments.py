from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate

from bnprobe.norms.moments import avg_pool_moments, conv_moments, leaky_relu_moments

SQRT_2PI = math.sqrt(2 * math.pi)


def _quad_moments(m: float, v: float, a: float) -> tuple[float, float]:
    """E and Var of leaky_relu(X), X ~ N(m, v), by quadrature in z = (x - m) / s."""
    s = math.sqrt(v)

    def leaky(z: float) -> float:
        x = m + s * z
        return x if x >= 0 else a * x

    z0 = -m / s  # the kink
    pieces = [(-np.inf, z0), (z0, np.inf)] if abs(z0) < 60 else [(-np.inf, np.inf)]

    def expect(g) -> float:
        total = 0.0
        for lo, hi in pieces:
            val, _ = integrate.quad(
                lambda z: g(z) * math.exp(-0.5 * z * z) / SQRT_2PI,
                lo,
                hi,
                epsabs=1e-14,
                epsrel=1e-12,
                limit=200,
            )
            total += val
        return total

    mean = expect(leaky)
    var = expect(lambda z: (leaky(z) - mean) ** 2)
    return mean, var


@pytest.mark.parametrize("slope", [0.0, 0.01, 0.3, 1.0])
def test_leaky_relu_moments_match_quadrature(slope):
    ms = [-6.0, -1.0, -0.1, 0.0, 0.3, 2.0, 10.0]
    vs = [1e-6, 0.01, 1.0, 4.0]
    grid = [(m, v) for m in ms for v in vs]
    m = torch.tensor([g[0] for g in grid], dtype=torch.float64)
    v = torch.tensor([g[1] for g in grid], dtype=torch.float64)
    mean, var = leaky_relu_moments(m, v, slope)
    for k, (mk, vk) in enumerate(grid):
        ref_mean, ref_var = _quad_moments(mk, vk, slope)
        assert mean[k].item() == pytest.approx(ref_mean, rel=1e-6, abs=1e-9), (mk, vk)
        assert var[k].item() == pytest.approx(ref_var, rel=1e-6, abs=1e-12), (mk, vk)


def test_leaky_relu_moments_limits_and_gradients():
    # v -> 0: a point mass at m; large |t|: identity (m > 0) or slope * identity (m < 0).
    m = torch.tensor([2.0, -2.0, 0.0, 50.0, -50.0], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64, requires_grad=True)
    mean, var = leaky_relu_moments(m, v, 0.1)
    expected_mean = torch.tensor([2.0, -0.2, 0.0, 50.0, -5.0], dtype=torch.float64)
    torch.testing.assert_close(mean.detach(), expected_mean, atol=1e-12, rtol=0)
    expected_var = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.01], dtype=torch.float64)
    torch.testing.assert_close(var.detach(), expected_var, atol=1e-12, rtol=1e-12)
    (mean.sum() + var.sum()).backward()
    assert torch.isfinite(m.grad).all() and torch.isfinite(v.grad).all()
    # d mean / d m = a + (1 - a) Phi(t): 1 for t >> 0, a for t << 0
    assert m.grad[3].item() == pytest.approx(1.0) and m.grad[4].item() == pytest.approx(0.1)


def test_leaky_relu_moments_float32_and_gradcheck():
    m = torch.linspace(-3, 3, 7)
    v = torch.full((7,), 0.5)
    mean32, var32 = leaky_relu_moments(m, v)
    mean64, var64 = leaky_relu_moments(m.double(), v.double())
    assert mean32.dtype == torch.float32
    torch.testing.assert_close(mean32, mean64.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var32, var64.float(), rtol=1e-5, atol=1e-6)
    args = (m.double().requires_grad_(), v.double().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: leaky_relu_moments(a, b, 0.2), args)


def test_conv_moments_formula_and_shapes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    m = torch.randn(3, generator=g, dtype=torch.float64)
    v = torch.rand(3, generator=g, dtype=torch.float64)
    mean, var = conv_moments(m, v, w, b)
    ref_mean = torch.stack([(w[o] * m[:, None, None]).sum() + b[o] for o in range(5)])
    ref_var = torch.stack([(w[o] ** 2 * v[:, None, None]).sum() for o in range(5)])
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)
    lin = w[:, :, 0, 0]
    mean_l, var_l = conv_moments(m, v, lin)
    torch.testing.assert_close(mean_l, lin @ m)
    torch.testing.assert_close(var_l, (lin**2) @ v)
    with pytest.raises(ValueError, match="input channels"):
        conv_moments(m[:2], v[:2], w)


def test_avg_pool_moments():
    m, v = torch.tensor([1.0, 2.0]), torch.tensor([4.0, 8.0])
    pm, pv = avg_pool_moments(m, v, (2, 2))
    torch.testing.assert_close(pm, m)
    torch.testing.assert_close(pv, v / 4)
    assert avg_pool_moments(m, v, 8)[1][1].item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        avg_pool_moments(m, v, 0)


def _channel_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = y.transpose(0, 1).reshape(y.shape[1], -1)
    return flat.mean(dim=1), flat.var(dim=1, unbiased=False)


def test_moment_propagation_matches_monte_carlo():
    g = torch.Generator().manual_seed(1)
    dt = torch.float64
    c0, c1, c2, n, size, slope = 6, 16, 12, 3000, 9, 0.1
    m0 = torch.randn(c0, generator=g, dtype=dt)
    v0 = torch.rand(c0, generator=g, dtype=dt) * 2 + 0.2
    x = m0[None, :, None, None] + v0.sqrt()[None, :, None, None] * torch.randn(
        n, c0, size, size, generator=g, dtype=dt
    )
    w1 = torch.randn(c1, c0, 3, 3, generator=g, dtype=dt) / math.sqrt(c0 * 9)
    b1 = torch.randn(c1, generator=g, dtype=dt) * 0.5
    w2 = torch.randn(c2, c1, 3, 3, generator=g, dtype=dt) / math.sqrt(c1 * 9)
    b2 = torch.randn(c2, generator=g, dtype=dt) * 0.5

    # padding=0: every output position is an interior one
    y1 = F.conv2d(x, w1, b1)
    pm1, pv1 = conv_moments(m0, v0, w1, b1)
    mc_m1, mc_v1 = _channel_stats(y1)
    torch.testing.assert_close(mc_m1, pm1, atol=0.02, rtol=0)
    torch.testing.assert_close(mc_v1, pv1, rtol=0.02, atol=0)

    a1 = F.leaky_relu(y1, slope)
    pm_a1, pv_a1 = leaky_relu_moments(pm1, pv1, slope)
    mc_m, mc_v = _channel_stats(a1)
    torch.testing.assert_close(mc_m, pm_a1, atol=0.02, rtol=0)
    torch.testing.assert_close(mc_v, pv_a1, rtol=0.03, atol=1e-3)

    # Layer 2 under the independence assumption: shuffle every (channel, position) of the
    # layer-1 activations independently over the samples (same marginals, no correlation).
    perm = torch.rand(a1.shape, generator=g, dtype=dt).argsort(dim=0)
    a1_indep = a1.gather(0, perm)
    pm2, pv2 = conv_moments(pm_a1, pv_a1, w2, b2)
    y2 = F.conv2d(a1_indep, w2, b2)
    mc_m2, mc_v2 = _channel_stats(y2)
    torch.testing.assert_close(mc_m2, pm2, atol=0.02, rtol=0)
    torch.testing.assert_close(mc_v2, pv2, rtol=0.03, atol=0)
    a2 = F.leaky_relu(y2, slope)
    pm_a2, pv_a2 = leaky_relu_moments(pm2, pv2, slope)
    mc_m, mc_v = _channel_stats(a2)
    torch.testing.assert_close(mc_m, pm_a2, atol=0.02, rtol=0)
    torch.testing.assert_close(mc_v, pv_a2, rtol=0.04, atol=1e-3)
    perm = torch.rand(a2.shape, generator=g, dtype=dt).argsort(dim=0)
    pooled = a2.gather(0, perm).mean(dim=(2, 3))  # global average pool of independent values
    pm_p, pv_p = avg_pool_moments(pm_a2, pv_a2, a2.shape[-2] * a2.shape[-1])
    torch.testing.assert_close(pooled.mean(dim=0), pm_p, atol=0.02, rtol=0)
    torch.testing.assert_close(pooled.var(dim=0), pv_p, rtol=0.1, atol=0)

    # With the real, spatially and channel-correlated activations the mean stays exact and
    # the variance is approximate (the paper's approximation).
    y2_real = F.conv2d(a1, w2, b2)
    mc_m2, mc_v2 = _channel_stats(y2_real)
    torch.testing.assert_close(mc_m2, pm2, atol=0.02, rtol=0)
    rel = (mc_v2 / pv2 - 1).abs()
    assert rel.mean() < 0.1 and rel.max() < 0.25
