from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnprobe.noise.modules import LearnedNoise
from bnprobe.norms.an import (
    ANConv2d,
    InputMoments,
    dataset_channel_moments,
    propagate_sequence,
)
from bnprobe.norms.moments import conv_moments, leaky_relu_moments

DT = torch.float64


def _moments(c, g):
    return torch.randn(c, generator=g, dtype=DT), torch.rand(c, generator=g, dtype=DT) + 0.5


def _an(cin, cout, k=3, g=None, **kwargs):
    layer = ANConv2d(cin, cout, k, **kwargs).double()
    if g is not None:
        with torch.no_grad():
            layer.scale.copy_(torch.rand(cout, generator=g, dtype=DT) + 0.5)
            layer.bias.copy_(torch.randn(cout, generator=g, dtype=DT))
    return layer


def test_an_matches_reference_formula():
    g = torch.Generator().manual_seed(0)
    layer = _an(3, 5, g=g, padding=1)
    m, v = _moments(3, g)
    x = torch.randn(4, 3, 7, 7, generator=g, dtype=DT)
    with pytest.raises(RuntimeError, match="input moments"):
        layer(x)
    out_m, out_v = layer.propagate(m, v)
    torch.testing.assert_close(out_m, layer.bias.detach())
    torch.testing.assert_close(out_v, layer.scale.detach() ** 2)
    w = layer.weight.detach()
    mu, var = conv_moments(m, v, w)
    sigma = (var + 1e-5).sqrt()
    ref = (F.conv2d(x, w, padding=1) - mu[None, :, None, None]) / sigma[None, :, None, None]
    ref = ref * layer.scale.detach()[None, :, None, None] + layer.bias.detach()[None, :, None, None]
    torch.testing.assert_close(layer(x), ref)
    torch.testing.assert_close(layer.last_sigma, sigma)
    assert layer.scale_invariant_weights() == [layer.weight]


def test_an_invariant_to_weight_scaling():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=DT)
    m, v = _moments(4, g)
    for eps, tol in ((0.0, 1e-12), (1e-5, 1e-4)):
        layer = _an(4, 6, g=g, eps=eps)
        layer.propagate(m, v)
        y0 = layer(x)
        with torch.no_grad():
            layer.weight.mul_(torch.rand(6, 1, 1, 1, generator=g, dtype=DT) * 3 + 0.5)
        torch.testing.assert_close(layer(x), y0, rtol=tol, atol=tol)
        with torch.no_grad():
            layer.weight.mul_(2.5)
        torch.testing.assert_close(layer(x), y0, rtol=tol, atol=tol)


def test_an_batch_independent_and_mode_independent():
    g = torch.Generator().manual_seed(2)
    layer = _an(3, 4, g=g, padding=1)
    m, v = _moments(3, g)
    layer.propagate(m, v)
    x = torch.randn(64, 3, 8, 8, generator=g, dtype=DT)
    full = layer(x)
    single = torch.cat([layer(x[i : i + 1]) for i in range(0, 64, 9)])
    torch.testing.assert_close(single, full[::9], rtol=1e-12, atol=1e-12)
    layer.eval()
    torch.testing.assert_close(layer(x), full, rtol=0, atol=0)
    # a BN-like layer would differ here: the output depends on the batch content
    torch.testing.assert_close(layer(x[:1] * 5)[0], layer(x * 5)[0], rtol=1e-12, atol=1e-12)


def test_an_gradients_flow_through_mu_sigma():
    g = torch.Generator().manual_seed(3)
    layer = _an(3, 4, eps=0.0)
    m, v = _moments(3, g)
    layer.propagate(m, v)
    x = torch.randn(5, 3, 7, 7, generator=g, dtype=DT)
    (layer(x) ** 3).sum().backward()
    grad = layer.weight.grad.clone()
    # exact scale invariance => gradient orthogonal to each weight row; this only holds
    # when the gradient also flows through mu(w) and sigma(w)
    dots = (grad * layer.weight.detach()).flatten(1).sum(dim=1)
    torch.testing.assert_close(dots, torch.zeros(4, dtype=DT), atol=1e-9, rtol=0)
    # compare with mu/sigma treated as constants: the gradient differs
    w = layer.weight.detach().clone().requires_grad_()
    mu, var = conv_moments(m, v, layer.weight.detach())
    y = (F.conv2d(x, w) - mu[None, :, None, None]) / var.sqrt()[None, :, None, None]
    (y**3).sum().backward()
    assert not torch.allclose(w.grad, grad, rtol=1e-3, atol=1e-6)


def test_an_first_layer_output_is_standardized():
    # i.i.d. Gaussian inputs with the given channel moments: x_hat has mean 0, variance 1
    # (positions of one input share inputs, so the standard errors come from per-input averages)
    g = torch.Generator().manual_seed(4)
    with torch.random.fork_rng():
        torch.manual_seed(4)  # the layer's own initialization, reproducibly
        layer = _an(4, 6)
    m, v = _moments(4, g)
    layer.propagate(m, v)
    n = 4000
    noise = torch.randn(n, 4, 5, 5, generator=g, dtype=DT)
    x = m[None, :, None, None] + v.sqrt()[None, :, None, None] * noise
    with torch.no_grad():
        y = layer(x).flatten(2)  # (n, 6, positions)
    first, second = y.mean(2), y.square().mean(2)  # per input: E[y], E[y^2] estimates
    for est, want in ((first, 0.0), (second, 1.0)):
        se = est.std(0) / n**0.5
        z = (est.mean(0) - want) / se
        assert z.abs().max() < 4, z
    y10 = y * 1.1  # a 10% error in the normalizer's scale would be caught
    assert (((y10.square().mean(2).mean(0) - 1) / (second.std(0) / n**0.5)).abs() > 4).all()


class _Block(nn.Module):
    def __init__(self, conv, norm):
        super().__init__()
        self.conv, self.norm = conv, norm

    def forward(self, x):
        return self.norm(self.conv(x))


def test_propagate_sequence_through_a_network():
    g = torch.Generator().manual_seed(5)
    a1, a2 = _an(3, 8, g=g, padding=1), _an(8, 6, g=g, stride=2)
    net = nn.Sequential(
        a1, nn.LeakyReLU(0.2), _Block(a2, nn.Identity()), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
    )
    m, v = _moments(3, g)
    out_m, out_v = propagate_sequence(net, m, v, input_size=(9, 9))
    # by hand: AN outputs (b, s^2), then the activations, then pooling over 4x4 positions
    m1, v1 = leaky_relu_moments(a1.bias, a1.scale**2, 0.2)
    torch.testing.assert_close(a2._m_in, m1)
    torch.testing.assert_close(a2._v_in, v1)
    m2, v2 = leaky_relu_moments(a2.bias, a2.scale**2, 0.0)
    torch.testing.assert_close(out_m, m2)
    torch.testing.assert_close(out_v, v2 / 16)
    x = torch.randn(2, 3, 9, 9, generator=g, dtype=DT)
    assert net(x).shape == (2, 6, 1, 1)
    # gradients reach the first layer's affine through the moment chain as well
    assert a2._m_in.requires_grad
    with pytest.raises(ValueError, match="input_size"):
        propagate_sequence(net, m, v)
    with pytest.raises(TypeError, match="BatchNorm2d"):
        propagate_sequence([a1, nn.BatchNorm2d(8)], m, v)


def test_propagate_sequence_with_noise_and_plain_layers():
    g = torch.Generator().manual_seed(6)
    noise = LearnedNoise(4)
    layer = _an(2, 4, k=1, scale=False, bias=False, noise=noise)
    with torch.no_grad():
        noise.scale.fill_(2.0)
        noise.bias.fill_(0.5)
    lin = nn.Linear(4, 3).double()
    m, v = _moments(2, g)
    out_m, out_v = propagate_sequence([layer, nn.Identity(), lin], m, v)
    ref_m = torch.full((4,), 1.0, dtype=DT)  # (0 + 0.5) * 2
    ref_v = torch.full((4,), 4.0, dtype=DT)
    torch.testing.assert_close(out_m, lin.weight.detach() @ ref_m + lin.bias.detach())
    torch.testing.assert_close(out_v, (lin.weight.detach() ** 2) @ ref_v)


def test_an_deepcopy_and_pickle_after_propagate():
    g = torch.Generator().manual_seed(7)
    a1, a2 = _an(3, 4, g=g), _an(4, 2, g=g)
    net = nn.Sequential(a1, nn.LeakyReLU(0.01), a2)
    m, v = _moments(3, g)
    propagate_sequence(net, m, v)  # a2 now stores non-leaf moments
    x = torch.randn(2, 3, 7, 7, generator=g, dtype=DT)
    y = net(x)
    torch.testing.assert_close(copy.deepcopy(net)(x), y)
    torch.testing.assert_close(pickle.loads(pickle.dumps(net))(x), y)
    state = copy.deepcopy(net.state_dict())
    assert set(state) == {"0.weight", "0.scale", "0.bias", "2.weight", "2.scale", "2.bias"}


def test_dataset_channel_moments_uint8_layouts():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(37, 5, 6, 3), dtype=np.uint8)  # N, H, W, C
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    m, v = dataset_channel_moments(images, mean, std, channel_dim=-1, chunk_size=8)
    x = torch.from_numpy(images).double() / 255
    x = (x - torch.tensor(mean, dtype=DT)) / torch.tensor(std, dtype=DT)
    flat = x.reshape(-1, 3)
    assert m.dtype == torch.float64
    torch.testing.assert_close(m, flat.mean(dim=0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, flat.var(dim=0, unbiased=False), rtol=1e-12, atol=1e-12)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # float: already [0, 1]
    m2, v2 = dataset_channel_moments(nchw, mean, std)
    torch.testing.assert_close(m2, m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v2, v, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        dataset_channel_moments(images, mean[:2], std, channel_dim=-1)


def test_input_moments_buffers_round_trip():
    store = InputMoments(3)
    m0, v0 = store()
    torch.testing.assert_close(m0, torch.zeros(3))
    torch.testing.assert_close(v0, torch.ones(3))
    store.set_(torch.tensor([0.1, 0.2, 0.3], dtype=DT), torch.tensor([1.0, 2.0, 3.0], dtype=DT))
    other = InputMoments(3)
    other.load_state_dict(store.state_dict())
    torch.testing.assert_close(other()[1], torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("size", [5, 1])  # at 1x1 only the centre tap is used: a shared crop
def test_forward_reuses_the_moments_of_propagate_once(monkeypatch, size):
    # propagate computes (mu, sigma) from the maps; the next forward must reuse them (one moment
    # pass per step, and the cropped kernel) with the same values and gradients, and recompute
    # after a weight change
    import bnprobe.norms.an as an_module

    g = torch.Generator().manual_seed(3)
    layer = _an(3, 4, g=g, padding=1)
    m = torch.randn(size, size, 3, generator=g, dtype=DT)
    v = torch.rand(size, size, 3, generator=g, dtype=DT) + 0.5
    x = torch.randn(2, 3, size, size, generator=g, dtype=DT)
    calls = []
    real = an_module.conv2d_map_moments
    monkeypatch.setattr(an_module, "conv2d_map_moments", lambda *a, **k: calls.append(1) or real(*a, **k))

    def step(reuse: bool):
        layer.zero_grad()
        out_m, out_v = layer.propagate(m, v)
        if not reuse:
            layer._normalizer_cache = None
        loss = layer(x).square().mean() + out_m.sum() + out_v.sum()
        loss.backward()
        return loss.detach(), layer.weight.grad.clone()

    calls.clear()
    loss_reused, grad_reused = step(reuse=True)
    assert len(calls) == 1
    calls.clear()
    loss_fresh, grad_fresh = step(reuse=False)
    assert len(calls) == 2
    torch.testing.assert_close(loss_reused, loss_fresh)
    torch.testing.assert_close(grad_reused, grad_fresh)
    # a second forward, or one after the weight changed, computes afresh
    layer.propagate(m, v)
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.5, 2.0, 4, dtype=DT).reshape(-1, 1, 1, 1))
        layer.weight.add_(0.1)
    calls.clear()
    after_change = layer(x)
    assert len(calls) == 1
    layer._normalizer_cache = None
    torch.testing.assert_close(after_change, layer(x))
