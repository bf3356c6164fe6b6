"""Spatial correlation in AN (bnprobe.norms.spatial): lag covariance, the first conv, the pool.

References: float64 loops over the definitions, quadratic forms of explicit patch
covariances, and Monte Carlo samples of stationary Gaussian fields with known covariance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnprobe.errors import BnprobeError
from bnprobe.norms.an import ANConv2d, InputMoments
from bnprobe.norms.an_graph import NodeMoments, graph_moments, trace
from bnprobe.norms.an_network import ANNetwork
from bnprobe.norms.init import init_input_moments_
from bnprobe.norms.moment_maps import channel_moments, max_pool2d_map_moments
from bnprobe.norms.spatial import conv2d_cov_moments, lag_covariance

DT = torch.float64


def _loop_lag_covariance(x: torch.Tensor, radius: int) -> torch.Tensor:
    n, c, h, w = x.shape
    xc = x - x.mean(dim=(0, 2, 3), keepdim=True)
    out = torch.zeros(c, c, 2 * radius + 1, 2 * radius + 1, dtype=DT)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
            ys2, xs2 = slice(ys.start + dy, ys.stop + dy), slice(xs.start + dx, xs.stop + dx)
            a, b = xc[:, :, ys, xs], xc[:, :, ys2, xs2]
            pairs = n * a.shape[2] * a.shape[3]
            out[:, :, dy + radius, dx + radius] = torch.einsum("nahw,nbhw->ab", a, b) / pairs
    return out


def test_lag_covariance_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 7, 9, generator=g, dtype=DT).cumsum(-1)
    x[:, 1] += 0.5 * x[:, 0] + 3.0
    cov = lag_covariance(x, 4)
    torch.testing.assert_close(cov, _loop_lag_covariance(x, 4), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cov, cov.flip(2, 3).transpose(0, 1))  # C[c, c', d] = C[c', c, -d]
    # the centre is the channel covariance; uint8 is scaled, std divides
    flat = (x - x.mean(dim=(0, 2, 3), keepdim=True)).transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(cov[:, :, 4, 4], flat @ flat.T / flat.shape[1])
    u8 = torch.randint(0, 256, (3, 3, 8, 8), generator=g, dtype=torch.uint8)
    std = torch.tensor([0.5, 0.25, 1.0], dtype=DT)
    expected = _loop_lag_covariance(u8.double() / 255.0, 2) / std.outer(std)[:, :, None, None]
    torch.testing.assert_close(lag_covariance(u8, 2, std=(0.5, 0.25, 1.0)), expected)
    with pytest.raises(ValueError, match="radius must be in"):
        lag_covariance(x, 7)


def _patch_variance(cov, w, size, stride, padding, dilation):
    # float64 reference: the quadratic form of each output's kernel in its patch covariance
    radius = (cov.shape[-1] - 1) // 2
    c_out, c_in, kh, kw = w.shape
    h, wd = size
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    var = torch.zeros(oh, ow, c_out, dtype=DT)
    for py in range(oh):
        for px in range(ow):
            taps = [(c, a, b, py * stride - padding + a * dilation, px * stride - padding + b * dilation)
                    for c in range(c_in) for a in range(kh) for b in range(kw)]  # fmt: skip
            taps = [t for t in taps if 0 <= t[3] < h and 0 <= t[4] < wd]
            s = torch.zeros(len(taps), len(taps), dtype=DT)
            for i, t in enumerate(taps):
                for j, u in enumerate(taps):
                    ly, lx = u[3] - t[3], u[4] - t[4]
                    if abs(ly) <= radius and abs(lx) <= radius:
                        s[i, j] = cov[t[0], u[0], ly + radius, lx + radius]
            wv = torch.stack([w[:, t[0], t[1], t[2]] for t in taps], 1)
            var[py, px] = torch.einsum("oi,ij,oj->o", wv, s, wv)
    return var


GEOMETRIES = [(3, 1, 1, 1), (5, 2, 2, 1), (3, 2, 0, 2), (4, 3, 2, 1)]


@pytest.mark.parametrize("k,stride,padding,dilation", GEOMETRIES)
def test_first_conv_variance_is_the_patch_quadratic_form(k, stride, padding, dilation):
    g = torch.Generator().manual_seed(k + stride)
    cov = lag_covariance(torch.randn(40, 3, 12, 12, generator=g, dtype=DT).cumsum(-1), 6)
    w = torch.randn(4, 3, k, k, generator=g, dtype=DT)
    m = torch.randn(9, 10, 3, generator=g, dtype=DT)
    mean, var, corr = conv2d_cov_moments(m, cov, w, None, stride, padding, dilation)
    torch.testing.assert_close(var, _patch_variance(cov, w, (9, 10), stride, padding, dilation))
    ref_mean = F.conv2d(m.permute(2, 0, 1)[None], w, None, stride, padding, dilation)[0].permute(1, 2, 0)
    torch.testing.assert_close(mean, ref_mean)
    assert corr.shape == (4, 5, 5)
    torch.testing.assert_close(corr[:, 2, 2], torch.ones(4, dtype=DT))


def test_first_conv_variance_with_same_padding_of_an_even_kernel():
    # "same" pads one more on the right/bottom for an even kernel: masks and size follow it
    g = torch.Generator().manual_seed(4)
    cov = lag_covariance(torch.randn(20, 2, 9, 9, generator=g, dtype=DT).cumsum(-1), 5)
    w = torch.randn(3, 2, 4, 4, generator=g, dtype=DT)
    _, var, _ = conv2d_cov_moments(torch.zeros(7, 7, 2, dtype=DT), cov, w, None, 1, "same", 1)
    padded = _patch_variance(cov, torch.nn.functional.pad(w, (1, 0, 1, 0)), (7, 7), 1, 2, 1)
    torch.testing.assert_close(var, padded)  # a 5x5 kernel with a zero first row/column, pad 2


@pytest.mark.parametrize("k,stride,dilation", [(3, 1, 1), (3, 2, 1), (2, 2, 2)])
def test_first_conv_correlation_matches_the_definition(k, stride, dilation):
    g = torch.Generator().manual_seed(7 * k + stride)
    cov = lag_covariance(torch.randn(30, 2, 16, 16, generator=g, dtype=DT).cumsum(-1).cumsum(-2), 10)
    w = torch.randn(3, 2, k, k, generator=g, dtype=DT)
    _, _, corr = conv2d_cov_moments(torch.zeros(20, 20, 2, dtype=DT), cov, w, None, stride, 0, dilation)
    ref = torch.zeros(3, 5, 5, dtype=DT)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            for a in range(k * k):
                for b in range(k * k):
                    ly = stride * dy + dilation * (b // k - a // k)
                    lx = stride * dx + dilation * (b % k - a % k)
                    if abs(ly) <= 10 and abs(lx) <= 10:
                        c = cov[:, :, ly + 10, lx + 10]
                        ref[:, dy + 2, dx + 2] += torch.einsum("oc,cd,od->o", w[:, :, a // k, a % k], c,
                                                               w[:, :, b // k, b % k])  # fmt: skip
    torch.testing.assert_close(corr, ref / ref[:, 2:3, 2:3])


def _field(n: int, size: int, rho: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # stationary Gaussian maps (n, C, size, size): separable AR(1) correlation rho_c^(|dy| + |dx|)
    grid = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    pos = torch.stack(grid, -1).reshape(-1, 2)
    dist = (pos[:, None] - pos[None]).abs().sum(-1).to(DT)
    maps = []
    for r in rho:
        chol = torch.linalg.cholesky(r ** dist + 1e-12 * torch.eye(dist.shape[0], dtype=DT))
        maps.append((torch.randn(n, dist.shape[0], generator=g, dtype=DT) @ chol.T).reshape(n, size, size))
    return torch.stack(maps, 1)


def _ar_corr(rho: torch.Tensor, lags: int = 2) -> torch.Tensor:
    d = torch.arange(-lags, lags + 1, dtype=DT).abs()
    return torch.stack([r ** (d[:, None] + d[None, :]) for r in rho])


def test_max_pool_of_correlated_values_against_monte_carlo():
    g = torch.Generator().manual_seed(1)
    rho = torch.tensor([0.95, 0.8, 0.3], dtype=DT)
    x = _field(100_000, 7, rho, g)
    m = 0.05 * torch.randn(7, 7, 3, generator=g, dtype=DT)
    sd = (0.1 * torch.rand(7, 7, 3, generator=g, dtype=DT) + 0.95).sqrt()
    y = F.max_pool2d(x * sd.permute(2, 0, 1) + m.permute(2, 0, 1), 3, 2, 1)
    emp_m, emp_v = y.mean(0).permute(1, 2, 0), y.var(0).permute(1, 2, 0)
    pm, pv = max_pool2d_map_moments(m, sd * sd, 3, 2, 1, corr=_ar_corr(rho))
    # equicorrelated windows (border windows have 4 or 6 values): measured mean within 0.05 sd,
    # variance within 2% (pooled)
    assert float(((pm - emp_m) / emp_v.sqrt()).abs().max()) < 0.07
    ratio = pv / emp_v
    assert float((ratio - 1).abs().max()) < 0.05, ratio
    # taken as independent, the correlated channels are far off (mean 0.6 sd, variance 0.5x)
    im, iv = max_pool2d_map_moments(m, sd * sd, 3, 2, 1)
    assert float(((im - emp_m) / emp_v.sqrt())[..., :2].abs().max()) > 0.4
    assert float((iv / emp_v)[..., :2].min()) < 0.7


def test_max_pool_of_equicorrelated_values_is_exact():
    # X_i = sqrt(r) Z_0 + sqrt(1 - r) Z_i: max = sqrt(r) Z_0 + sqrt(1 - r) max_i Z_i
    from bnprobe.norms.moments import _max_normal_moments

    e1, e2 = _max_normal_moments(9)
    r = torch.tensor([0.0, 0.3, 0.9], dtype=DT)
    corr = r[:, None, None].expand(3, 5, 5).clone()
    corr[:, 2, 2] = 1.0
    mean, var = max_pool2d_map_moments(torch.zeros(3, 3, 3, dtype=DT), torch.ones(3, 3, 3, dtype=DT), 3,
                                       corr=corr)  # fmt: skip
    torch.testing.assert_close(mean.flatten(), (1 - r).sqrt() * e1)
    torch.testing.assert_close(var.flatten(), r + (1 - r) * e2)


def _stem() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=0, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ).double().eval()  # fmt: skip


def test_graph_uses_the_input_covariance_through_conv_bn_relu_pool():
    # a stem on stationary correlated input: the conv's variance and the pool's moments against
    # Monte Carlo; without the covariance (independence) the same prediction is far off. The
    # conv reads no padding: its output is stationary (at a padded border the correlation of the
    # interior is an approximation)
    g = torch.Generator().manual_seed(5)
    rho = torch.tensor([0.9, 0.6], dtype=DT)
    mix = torch.tensor([[1.0, 0.0], [0.7, 0.7]], dtype=DT)
    x = torch.einsum("dc,nchw->ndhw", mix, _field(40_000, 12, rho, g))
    model = _stem()
    with torch.no_grad():
        conv_out = model[0](x)
        model[1].running_mean.copy_(conv_out.mean(dim=(0, 2, 3)))
        model[1].running_var.copy_(conv_out.var(dim=(0, 2, 3)))
        out = model(x)
    cov = lag_covariance(x[:4000], 10)
    gm = trace(model)
    spatial = graph_moments(gm, x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3)), (12, 12), cov)
    plain = graph_moments(gm, x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3)), (12, 12))
    emp_conv = conv_out.var(0).permute(1, 2, 0)
    assert float((spatial["_0"].var.detach() / emp_conv - 1).abs().max()) < 0.05
    assert float((plain["_0"].var.detach() / emp_conv - 1).abs().max()) > 0.2
    assert spatial["_1"].corr is not None and spatial["_2"].pre[0].corr is not None
    emp_m, emp_v = out.mean(0).permute(1, 2, 0), out.var(0).permute(1, 2, 0)
    sp = NodeMoments(spatial["output"].mean.detach(), spatial["output"].var.detach())
    assert float(((sp.mean - emp_m) / emp_v.sqrt()).abs().max()) < 0.06
    assert float((sp.var / emp_v - 1).abs().max()) < 0.05
    pl = plain["output"]
    assert float(((pl.mean.detach() - emp_m) / emp_v.sqrt()).abs().max()) > 0.2
    # past a node that is not a per-channel map the correlation is dropped
    assert spatial["output"].corr is None


def test_input_covariance_shape_is_checked():
    with pytest.raises(BnprobeError, match=r"lag covariance must have shape \(2, 2, 2R\+1, 2R\+1\)"):
        graph_moments(trace(_stem()), torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT), (8, 8),
                      torch.zeros(3, 3, 5, 5, dtype=DT))  # fmt: skip


def test_an_layer_with_covariance_normalizes_by_the_exact_variance_and_is_differentiable():
    g = torch.Generator().manual_seed(2)
    cov = lag_covariance(torch.randn(20, 3, 10, 10, generator=g, dtype=DT).cumsum(-1), 4)
    layer = ANConv2d(3, 5, 3, stride=2, padding=1).double()
    m, v = torch.zeros(10, 10, 3, dtype=DT), cov[:, :, 4, 4].diagonal().expand(10, 10, 3)
    out_m, out_v, corr = layer.propagate_spatial(m, v, cov)
    _, ref_var, ref_corr = conv2d_cov_moments(m, cov, layer.weight, None, 2, 1, 1)
    mu, sigma = layer.normalizer_moments()
    expected = channel_moments(torch.zeros_like(ref_var), ref_var)[1] + layer.eps
    torch.testing.assert_close(sigma * sigma, expected)
    torch.testing.assert_close(corr, ref_corr)
    # the plain propagate forgets the covariance
    layer.propagate(m, v)
    assert layer._cov_in is None
    w = layer.weight.detach().clone().requires_grad_()

    def sd(weight):
        return conv2d_cov_moments(m, cov, weight, None, 2, 1, 1)[1].sum()

    assert torch.autograd.gradcheck(sd, (w,))


def test_input_moments_keep_the_covariance_in_the_state_dict():
    store = InputMoments(3, spatial=True)
    assert store.covariance() is None
    cov = torch.randn(3, 3, 5, 5)
    store.set_(torch.zeros(3), torch.ones(3), cov)
    fresh = InputMoments(3, spatial=True)
    fresh.load_state_dict(store.state_dict())  # the radius is taken from the saved tensor
    torch.testing.assert_close(fresh.covariance(), cov)
    old = {k: t for k, t in store.state_dict().items() if k != "cov"}  # saved before it existed
    again = InputMoments(3, spatial=True)
    again.load_state_dict(old)
    assert again.covariance() is None
    plain = InputMoments(3)  # All-CNN's: channel moments only
    plain.set_(torch.zeros(3), torch.ones(3), cov)
    assert plain.covariance() is None and "cov" not in plain.state_dict()


def test_init_input_moments_fills_the_covariance_of_an_networks_only():
    net = ANNetwork(nn.Sequential(ANConv2d(3, 4, 3, padding=1)), 3)
    images = torch.randint(0, 256, (8, 3, 6, 6), dtype=torch.uint8)
    init_input_moments_(net, images, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    cov = net.input_moments.covariance()
    assert cov is not None and cov.shape == (3, 3, 11, 11)  # radius capped by the image size
    torch.testing.assert_close(cov, lag_covariance(images, 5, std=(0.25,) * 3).float())
    torch.testing.assert_close(cov[:, :, 5, 5].diagonal(), net.input_moments.var)
    net(torch.randn(2, 3, 6, 6))
    assert net.net[0]._cov_in is not None
