"""Every moment rule against Monte Carlo moments of the same module/function on Gaussian input.

The check: with ``n`` independent samples (images) per channel, the predicted mean and
variance must lie within 3 standard errors of the sample mean and variance, the standard
errors being ``sqrt(var / n)`` and ``sqrt((mu4 - var^2) / n)``. Where one image holds several
(dependent) output positions, the per-image statistics are the samples (cluster standard
errors). Each case also checks that the test can fail: the rule's mean moved by 10% of the
standard deviation, or its variance scaled by 1.1, is rejected.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, special
from torch import nn
from torchvision.ops import StochasticDepth

from bnprobe.norms.an_graph import graph_moments, trace
from bnprobe.norms.moment_maps import channel_moments, conv2d_map_moments, max_pool2d_map_moments
from bnprobe.norms.moments import (
    add_moments,
    concat_moments,
    gaussian_map_moments,
    hardswish_moments,
    hardtanh_moments,
    leaky_relu_moments,
    max_of_gaussians_moments,
    piecewise_polynomial_moments,
    product_moments,
)

DT = torch.float64
SQRT_2PI = math.sqrt(2 * math.pi)
N_SAMPLES = 100_000
# channels with negative, zero and positive means, small and large variances; none of the
# tested maps is constant on a channel up to events rarer than ~1 / N_SAMPLES (whose variance
# Monte Carlo cannot estimate)
M = [-0.5, -2.0, 0.0, 0.7, 3.0, 1.5]
V = [0.05, 4.0, 1.0, 9.0, 0.3, 0.01]


def _gaussian(n: int, m, v, shape=(), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m_t = torch.tensor(m, dtype=DT).reshape(-1, *([1] * len(shape)))
    s_t = torch.tensor(v, dtype=DT).sqrt().reshape(-1, *([1] * len(shape)))
    return m_t + s_t * torch.randn(n, len(m), *shape, generator=g, dtype=DT)


def _mc(y: torch.Tensor):
    """Sample mean/variance per channel and their standard errors (per-image clusters)."""
    n, c = y.shape[:2]
    flat = y.reshape(n, c, -1)
    t = flat.mean(dim=2)
    mean = t.mean(dim=0)
    s = (flat - mean[None, :, None]).square().mean(dim=2)
    var = s.mean(dim=0)
    return mean, var, t.std(dim=0) / math.sqrt(n), s.std(dim=0) / math.sqrt(n)


def _accepts(y, pm, pv, k: float = 3.0, atol: float = 1e-10) -> torch.Tensor:
    mean, var, se_m, se_v = _mc(y)
    ok_m = (pm.detach() - mean).abs() <= k * se_m + atol
    ok_v = (pv.detach() - var).abs() <= k * se_v + atol
    return ok_m & ok_v


def _check_rule(y, pm, pv) -> None:
    """Accept the rule within 3 standard errors; reject it perturbed by 10%."""
    mean, var, se_m, se_v = _mc(y)
    ok = _accepts(y, pm, pv)
    detail = {
        "z_mean": ((pm.detach() - mean) / se_m).tolist(),
        "z_var": ((pv.detach() - var) / se_v).tolist(),
    }
    assert bool(ok.all()), detail
    # The perturbed rule must be rejected on every channel where 10% is at least 5 standard
    # errors (all but heavy-tailed ones, e.g. a ReLU that is positive 1% of the time), and
    # those must be the majority.
    sd = pv.detach().sqrt()
    power_m, power_v = 0.1 * sd >= 5 * se_m, 0.1 * pv.detach() >= 5 * se_v
    assert power_m.sum() * 2 > len(power_m) and power_v.sum() * 2 > len(power_v), (se_m, se_v)
    assert not bool(_accepts(y, pm + 0.1 * sd, pv)[power_m].any()), "mean +10% sd not rejected"
    assert not bool(_accepts(y, pm, pv * 1.1)[power_v].any()), "variance x1.1 not rejected"


def _module_prediction(module: nn.Module, m, v, size):
    """Output moments of ``module`` by the graph rules (input ``(C,)`` moments and size)."""
    gm = trace(module)  # a lone module is wrapped in nn.Sequential
    out = graph_moments(gm, torch.tensor(m, dtype=DT), torch.tensor(v, dtype=DT), size)
    return out["output"]


ELEMENTWISE = [
    nn.ReLU(),
    nn.LeakyReLU(0.2),
    nn.ReLU6(),
    nn.Hardtanh(-1.0, 2.0),
    nn.Hardsigmoid(),
    nn.Hardswish(),
    nn.SiLU(),
    nn.GELU(),
    nn.GELU(approximate="tanh"),
    nn.Sigmoid(),
    nn.Tanh(),
    nn.Softplus(beta=2.0),
    nn.Mish(),
    nn.Dropout(0.3),
    nn.Identity(),
    StochasticDepth(0.2, "row"),
]


@pytest.mark.parametrize("module", ELEMENTWISE, ids=lambda m: repr(m))
def test_elementwise_module_rules_match_monte_carlo(module):
    module = module.eval()
    x = _gaussian(N_SAMPLES, M, V, (1, 1))
    with torch.no_grad():
        y = module(x)
    pred = _module_prediction(module, M, V, (1, 1))
    _check_rule(y, *pred.channel())


def _fn_module(fn):
    class Fn(nn.Module):
        def forward(self, x):
            return fn(x)

    return Fn()


@pytest.mark.parametrize(
    "fn",
    [F.relu, torch.relu, F.relu6, lambda x: F.leaky_relu(x, 0.1), lambda x: F.hardtanh(x, -2.0, 2.5),
     F.hardswish, F.hardsigmoid, F.silu, F.gelu, torch.sigmoid, torch.tanh, lambda x: x.relu(),
     lambda x: x.sigmoid(), lambda x: F.dropout(x, 0.5, training=False)],
    ids=["relu", "torch.relu", "relu6", "leaky", "hardtanh", "hardswish", "hardsigmoid", "silu",
         "gelu", "sigmoid", "tanh", "method relu", "method sigmoid", "dropout"],
)  # fmt: skip
def test_elementwise_function_rules_match_monte_carlo(fn):
    x = _gaussian(N_SAMPLES, M, V, (1, 1), seed=1)
    y = fn(x)
    pred = _module_prediction(_fn_module(fn), M, V, (1, 1))
    _check_rule(y, *pred.channel())


C4_M, C4_V = [-1.0, 0.0, 0.5, 2.0], [0.5, 1.0, 4.0, 0.1]

SPATIAL = [
    ("conv s2 p1", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (9, 9)),
    ("conv depthwise dil2", lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4), (7, 7)),
    ("conv same groups2 bias", lambda: nn.Conv2d(4, 6, 3, padding="same", groups=2), (6, 6)),
    ("conv 3x1 s(2,1)", lambda: nn.Conv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0)), (8, 5)),
    ("conv 7x7 s2 p3", lambda: nn.Conv2d(4, 5, 7, stride=2, padding=3, bias=False), (8, 8)),
    ("conv 1x1", lambda: nn.Conv2d(4, 6, 1), (3, 3)),
    ("avgpool 3 s2 p1", lambda: nn.AvgPool2d(3, 2, 1), (7, 7)),
    ("avgpool excl. pad ceil", lambda: nn.AvgPool2d(3, 2, 1, True, count_include_pad=False), (8, 8)),
    ("avgpool divisor", lambda: nn.AvgPool2d(2, divisor_override=3), (6, 6)),
    ("adaptive avg 1", lambda: nn.AdaptiveAvgPool2d(1), (5, 5)),
    ("adaptive avg (3, 2)", lambda: nn.AdaptiveAvgPool2d((3, 2)), (7, 7)),
    ("adaptive avg up", lambda: nn.AdaptiveAvgPool2d(4), (3, 3)),
    ("maxpool 3 s2 p1", lambda: nn.MaxPool2d(3, 2, 1), (8, 8)),
    ("maxpool 2", lambda: nn.MaxPool2d(2), (6, 6)),
    ("maxpool ceil", lambda: nn.MaxPool2d(3, 2, ceil_mode=True), (8, 8)),
    ("maxpool dil2", lambda: nn.MaxPool2d(3, 1, 1, dilation=2), (7, 7)),
    ("flatten linear", lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 5)), (2, 2)),
    ("bn eval", lambda: _bn_eval(), (2, 2)),
]  # fmt: skip


def _bn_eval() -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(3)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4, generator=g))
        bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(4, generator=g))
        bn.bias.copy_(torch.randn(4, generator=g))
    return bn.eval()


@pytest.mark.parametrize("name,factory,size", SPATIAL, ids=[s[0] for s in SPATIAL])
def test_spatial_module_rules_match_monte_carlo(name, factory, size):
    torch.manual_seed(0)  # module init only
    module = factory().double().eval()
    with torch.no_grad():
        probe = module(torch.zeros(1, 4, *size, dtype=DT))
    positions = probe[0, 0].numel()
    n = math.ceil(N_SAMPLES / positions)
    x = _gaussian(n, C4_M, C4_V, size, seed=2)  # independent positions and channels
    with torch.no_grad():
        y = module(x)
    pred = _module_prediction(module, C4_M, C4_V, size)
    assert pred.size == (None if probe.dim() == 2 else tuple(probe.shape[-2:]))
    _check_rule(y, *pred.channel())


def test_batch_norm_training_mode_gives_its_affine():
    bn = _bn_eval().double().train()
    x = _gaussian(4096, C4_M, C4_V, (2, 2), seed=4)
    y = bn(x)
    pred = _module_prediction(bn, C4_M, C4_V, (2, 2))
    mean, var, _, _ = _mc(y.detach())
    pm, pv = pred.channel()
    torch.testing.assert_close(pm, mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(pv, var, rtol=1e-4, atol=0)


def test_maxpool_after_relu_pools_the_preactivation():
    # max(relu(x)) = relu(max(x)): pooling the Gaussian pre-activation is far more accurate
    # than pooling the rectified values as if they were Gaussian (not exact: the window's
    # maximum is skewed, and relu of it is computed as for a Gaussian).
    size, m, v = (8, 8), [-1.0, 0.0, 1.0, 0.3], [1.0, 1.0, 0.25, 4.0]
    x = _gaussian(4000, m, v, size, seed=5)
    seq = nn.Sequential(nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    y = seq(x)
    mean, var, _, _ = _mc(y)
    pred = _module_prediction(seq, m, v, size)
    relu_m, relu_v = leaky_relu_moments(torch.tensor(m, dtype=DT), torch.tensor(v, dtype=DT), 0.0)
    plain = max_pool2d_map_moments(relu_m.expand(*size, -1), relu_v.expand(*size, -1), 3, 2, 1)
    plain_m, plain_v = channel_moments(*plain)
    pm, pv = pred.channel()
    err = ((pm - mean) / var.sqrt()).abs().max(), (pv / var - 1).abs().max()
    err_plain = ((plain_m - mean) / var.sqrt()).abs().max(), (plain_v / var - 1).abs().max()
    # measured: mean error 0.010 sd and variance error 7.6% commuted, against 0.28 sd and 89%
    assert err[0] < 0.03 and err[1] < 0.1, err
    assert err_plain[0] > 5 * err[0] and err_plain[1] > 5 * err[1], (err, err_plain)


def test_sum_product_concat_of_independent_values():
    a = _gaussian(N_SAMPLES, M, V, seed=6)
    b = _gaussian(N_SAMPLES, [0.3, -1.0, 2.0, 0.0, -0.2, 1.0], [1.0, 0.2, 3.0, 0.5, 2.0, 0.04], seed=7)
    ma, va = torch.tensor(M, dtype=DT), torch.tensor(V, dtype=DT)
    mb = torch.tensor([0.3, -1.0, 2.0, 0.0, -0.2, 1.0], dtype=DT)
    vb = torch.tensor([1.0, 0.2, 3.0, 0.5, 2.0, 0.04], dtype=DT)
    _check_rule(a + b, *add_moments((ma, va), (mb, vb)))
    _check_rule(a * b, *product_moments(ma, va, mb, vb))
    # squeeze-and-excitation: x * sigmoid(s), the gate independent of x
    gm, gv = gaussian_map_moments(torch.sigmoid, mb, vb)
    _check_rule(a * torch.sigmoid(b), *product_moments(ma, va, gm, gv))
    cm, cv = concat_moments([(ma, va), (mb, vb)])
    _check_rule(torch.cat([a, b], dim=1), cm, cv)


@pytest.mark.parametrize("n", [1, 2, 9, 25])
def test_max_of_independent_gaussians(n):
    x = _gaussian(N_SAMPLES, M, V, (n,), seed=8)
    _check_rule(x.amax(dim=2, keepdim=True), *max_of_gaussians_moments(torch.tensor(M, dtype=DT),
                                                                      torch.tensor(V, dtype=DT), n))


def _quad(fn, m: float, v: float, kinks=()):
    s = math.sqrt(v)
    points = sorted((k - m) / s for k in kinks if abs((k - m) / s) < 12)

    def expect(g):
        def integrand(z):
            return g(m + s * z) * math.exp(-0.5 * z * z) / SQRT_2PI

        return integrate.quad(integrand, -12, 12, points=points or None, limit=400, epsabs=1e-14,
                              epsrel=1e-12)[0]  # fmt: skip

    mean = expect(fn)
    return mean, expect(lambda x: (fn(x) - mean) ** 2)


def test_piecewise_rules_are_exact():
    grid = [(m, v) for m in (-7.0, -0.4, 2.9, 5.9) for v in (1e-4, 0.09, 16.0)] + [(0.0, 1.0)]
    m = torch.tensor([g[0] for g in grid], dtype=DT)
    v = torch.tensor([g[1] for g in grid], dtype=DT)
    cases = [
        (lambda t, u: hardtanh_moments(t, u, 0.0, 6.0), lambda x: min(max(x, 0.0), 6.0), (0.0, 6.0)),
        (hardswish_moments, lambda x: x * min(max(x + 3.0, 0.0), 6.0) / 6.0, (-3.0, 3.0)),
        (lambda t, u: piecewise_polynomial_moments([(-math.inf, 1.0, (2.0, -1.0, 0.5)),
                                                    (1.0, math.inf, (1.0, 0.0, 0.0, 0.5))], t, u),
         lambda x: 2.0 - x + 0.5 * x * x if x < 1.0 else 1.0 + 0.5 * x**3, (1.0,)),
    ]  # fmt: skip
    for rule, fn, kinks in cases:
        mean, var = rule(m, v)
        for k, (mk, vk) in enumerate(grid):
            ref_m, ref_v = _quad(fn, mk, vk, kinks)
            assert mean[k].item() == pytest.approx(ref_m, rel=1e-8, abs=1e-10), (mk, vk)
            assert var[k].item() == pytest.approx(ref_v, rel=1e-6, abs=1e-12), (mk, vk)


@pytest.mark.parametrize(
    "fn,npfn,tol",
    [(F.silu, lambda x: x / (1 + np.exp(-x)), 1e-5), (torch.sigmoid, lambda x: 1 / (1 + np.exp(-x)), 1e-5),
     (F.gelu, lambda x: x * special.ndtr(x), 1e-5), (torch.tanh, np.tanh, 2e-3)],
    ids=["silu", "sigmoid", "gelu", "tanh"],
)  # fmt: skip
def test_quadrature_accuracy(fn, npfn, tol):
    # relative to the output's standard deviation, for v <= 16 (the module docstring's claim)
    for mk in (-3.0, 0.0, 1.0):
        for vk in (0.01, 1.0, 16.0):
            mean, var = gaussian_map_moments(fn, torch.tensor(mk, dtype=DT), torch.tensor(vk, dtype=DT))
            ref_m, ref_v = _quad(npfn, mk, vk, (0.0,))
            assert abs(mean.item() - ref_m) <= tol * math.sqrt(ref_v), (mk, vk)
            assert abs(var.item() / ref_v - 1) <= tol, (mk, vk)


def test_rules_are_differentiable():
    m = torch.tensor([-1.0, 0.2, 2.5], dtype=DT, requires_grad=True)
    v = torch.tensor([0.5, 1.0, 3.0], dtype=DT, requires_grad=True)
    checks = [
        lambda a, b: hardswish_moments(a, b),
        lambda a, b: hardtanh_moments(a, b, 0.0, 6.0),
        lambda a, b: gaussian_map_moments(F.silu, a, b, order=32),
        lambda a, b: max_of_gaussians_moments(a, b, 9),
    ]
    for f in checks:
        assert torch.autograd.gradcheck(f, (m, v))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": 1},
        {"stride": 2, "padding": 1, "dilation": 2},
        {"groups": 2, "padding": "same"},
        {"groups": 4, "stride": (2, 1), "padding": (0, 1)},
        {"padding": 1, "padding_mode": "reflect"},
    ],
)
def test_conv2d_map_moments_matches_autograd_of_two_convolutions(kwargs):
    # the hand-written backward of the moment convolution against autograd through F.conv2d
    g = torch.Generator().manual_seed(5)
    groups = kwargs.get("groups", 1)
    weight = torch.randn(8, 4 // groups, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.randn(7, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = (torch.rand(7, 6, 4, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    out_m, out_v = conv2d_map_moments(m, v, weight, bias, **kwargs)

    def reference(x, w, b):
        x = x.permute(2, 0, 1).unsqueeze(0)
        mode = kwargs.get("padding_mode", "zeros")
        conv_kwargs = {k: kwargs[k] for k in ("stride", "dilation", "groups") if k in kwargs}
        padding = kwargs.get("padding", 0)
        if mode != "zeros":
            x, padding = F.pad(x, (padding,) * 4, mode=mode), 0
        return F.conv2d(x, w, b, padding=padding, **conv_kwargs).squeeze(0).permute(1, 2, 0)

    ref_m, ref_v = reference(m, weight, bias), reference(v, weight * weight, None)
    torch.testing.assert_close(out_m, ref_m)
    torch.testing.assert_close(out_v, ref_v)
    g_m, g_v = torch.randn_like(out_m), torch.randn_like(out_v)
    mine = torch.autograd.grad((out_m * g_m).sum() + (out_v * g_v).sum(), (m, v, weight, bias))
    theirs = torch.autograd.grad((ref_m * g_m).sum() + (ref_v * g_v).sum(), (m, v, weight, bias))
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "size, kernel, kwargs",
    [
        ((1, 1), (3, 3), {"padding": 1}),  # only the centre tap reads the map
        ((2, 2), (3, 3), {"padding": 1, "stride": 2}),
        ((1, 3), (3, 3), {"padding": 2, "dilation": 2}),
        ((2, 1), (3, 5), {"padding": (1, 3)}),
        ((4, 4), (3, 3), {"padding": 1}),  # nothing to crop
    ],
)
def test_conv2d_map_moments_of_small_maps_skip_padding_taps_exactly(size, kernel, kwargs):
    # taps that read only padding are cropped from the kernel: same maps, same gradients
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(5, 3, *kernel, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.randn(*size, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = (torch.rand(*size, 3, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    out_m, out_v = conv2d_map_moments(m, v, weight, None, **kwargs)

    def reference(x, w):
        return F.conv2d(x.permute(2, 0, 1).unsqueeze(0), w, **kwargs).squeeze(0).permute(1, 2, 0)

    ref_m, ref_v = reference(m, weight), reference(v, weight * weight)
    torch.testing.assert_close(out_m, ref_m)
    torch.testing.assert_close(out_v, ref_v)
    mine = torch.autograd.grad(out_m.sum() + (out_v * out_v).sum(), (m, v, weight))
    theirs = torch.autograd.grad(ref_m.sum() + (ref_v * ref_v).sum(), (m, v, weight))
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_relu_of_a_sum_with_a_relu_matches_adaptive_quadrature(slope):
    # act(A + h(Y)) with h = act = leaky ReLU (a residual sum after a ReLU): the rule integrates
    # over Y piecewise at h's kink; against scipy's adaptive quadrature it must be good to 1e-3
    # (Gauss-Hermite across the kink with 64 nodes was off by up to 5e-3 sd in the mean)
    from scipy import integrate, stats

    from bnprobe.norms import an_rules

    rng = np.random.default_rng(1)
    a_m, y_m = rng.normal(size=(2, 40)) * 1.5
    a_v, y_v = rng.uniform(0.02, 2.0, size=(2, 40))

    def relu(x):
        return x if x > 0 else slope * x

    def moments_of_act(c, am, av):  # E[act(A + c)], E[act(A + c)^2] in closed form
        s, mu = np.sqrt(av), am + c
        t = mu / s
        cdf, pdf = stats.norm.cdf(t), stats.norm.pdf(t)
        pos1, pos2 = mu * cdf + s * pdf, (mu * mu + av) * cdf + mu * s * pdf
        neg1, neg2 = mu * (1 - cdf) - s * pdf, (mu * mu + av) * (1 - cdf) - mu * s * pdf
        return pos1 + slope * neg1, pos2 + slope * slope * neg2

    def reference(am, av, ym, yv):
        sy, kink = np.sqrt(yv), -ym / np.sqrt(yv)
        out = []
        for k in (0, 1):
            f = lambda z: moments_of_act(relu(ym + sy * z), am, av)[k] * stats.norm.pdf(z)  # noqa: E731, B023
            pieces = ((-12, kink), (kink, 12))
            out.append(sum(integrate.quad(f, lo, hi, epsabs=1e-13)[0] for lo, hi in pieces))
        return out[0], out[1] - out[0] ** 2

    ref = np.array([reference(*c) for c in zip(a_m, a_v, y_m, y_v)])
    act = an_rules._relu(slope)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    mean, var = an_rules._sum_rule((t(a_m), t(a_v), an_rules.NodeMoments(t(y_m), t(y_v)), act), act)
    assert (np.abs(mean.numpy() - ref[:, 0]) / np.sqrt(ref[:, 1])).max() < 1e-3
    assert (np.abs(var.numpy() - ref[:, 1]) / ref[:, 1]).max() < 5e-3
