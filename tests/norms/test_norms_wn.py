from __future__ import annotations

import copy
import io
import pickle

import torch
import torch.nn.functional as F

from bnprobe.noise.modules import FixedNoise
from bnprobe.norms.wn import WNConv2d, WNLinear


def _randomize_affine(module, g):
    with torch.no_grad():
        module.scale.copy_(
            torch.rand(module.scale.shape, generator=g, dtype=module.scale.dtype) + 0.5
        )
        module.bias.copy_(torch.randn(module.bias.shape, generator=g, dtype=module.bias.dtype))


def test_wnconv_matches_reference_and_has_unit_rows():
    g = torch.Generator().manual_seed(0)
    conv = WNConv2d(3, 5, 3, stride=2, padding=1).double()
    _randomize_affine(conv, g)
    x = torch.randn(4, 3, 9, 9, generator=g, dtype=torch.float64)
    w = conv.weight.detach()
    w_hat = w / w.flatten(1).norm(dim=1)[:, None, None, None]
    ref = F.conv2d(x, w_hat, stride=2, padding=1) * conv.scale.detach()[None, :, None, None]
    ref = ref + conv.bias.detach()[None, :, None, None]
    torch.testing.assert_close(conv(x), ref)
    norms = conv.normalized_weight().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(5, dtype=torch.float64))
    assert conv.scale_invariant_weights() == [conv.weight]
    assert set(conv.state_dict()) == {"weight", "scale", "bias"}


def test_wn_outputs_invariant_to_weight_scaling():
    g = torch.Generator().manual_seed(1)
    conv = WNConv2d(4, 6, 3, padding=1).double()
    lin = WNLinear(7, 3).double()
    _randomize_affine(conv, g)
    _randomize_affine(lin, g)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    z = torch.randn(5, 7, generator=g, dtype=torch.float64)
    y0, u0 = conv(x), lin(z)
    with torch.no_grad():
        conv.weight.mul_(3.7)
        lin.weight.mul_(0.01)
    torch.testing.assert_close(conv(x), y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lin(z), u0, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # a different positive factor per output channel
        conv.weight.mul_(torch.rand(6, 1, 1, 1, generator=g, dtype=torch.float64) * 10 + 0.1)
    torch.testing.assert_close(conv(x), y0, rtol=1e-12, atol=1e-12)
    # a negative factor is not an invariance (sanity check that the test can fail)
    with torch.no_grad():
        conv.weight[0].mul_(-1.0)
    assert not torch.allclose(conv(x), y0)


def test_wn_gradient_is_orthogonal_to_weight():
    # scale invariance implies <dL/dw_o, w_o> = 0 for every output unit
    g = torch.Generator().manual_seed(2)
    conv = WNConv2d(3, 4, 3).double()
    x = torch.randn(3, 3, 7, 7, generator=g, dtype=torch.float64)
    (conv(x) ** 3).sum().backward()
    dots = (conv.weight.grad * conv.weight).flatten(1).sum(dim=1)
    torch.testing.assert_close(dots, torch.zeros(4, dtype=torch.float64), atol=1e-10, rtol=0)
    assert conv.weight.grad.abs().max() > 1e-3


def test_wn_deepcopy_state_dict_and_pickle_round_trip():
    g = torch.Generator().manual_seed(3)
    conv = WNConv2d(3, 4, 3, padding=1)
    _randomize_affine(conv, g)
    x = torch.randn(2, 3, 5, 5, generator=g)
    y = conv(x)
    torch.testing.assert_close(copy.deepcopy(conv)(x), y, rtol=0, atol=0)
    fresh = WNConv2d(3, 4, 3, padding=1)
    assert not torch.allclose(fresh(x), y)
    buf = io.BytesIO()
    torch.save(conv.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    torch.testing.assert_close(pickle.loads(pickle.dumps(conv))(x), y, rtol=0, atol=0)
    lin = WNLinear(4, 2, bias=False)
    assert lin.bias is None and set(lin.state_dict()) == {"weight", "scale"}
    z = x[:, 0, 0, :4]
    torch.testing.assert_close(copy.deepcopy(lin)(z), lin(z))
    z3 = x[:, :, 0, :4]  # extra leading dims: features are the last dim, like nn.Linear
    torch.testing.assert_close(lin(z3), F.linear(z3, lin.normalized_weight()) * lin.scale)


def test_wn_noise_sits_between_normalization_and_affine():
    g = torch.Generator().manual_seed(4)
    noise = FixedNoise(4, sigma_v=0.3, sigma_u=0.2)
    conv = WNConv2d(3, 4, 3, noise=noise).double()
    _randomize_affine(conv, g)
    x = torch.randn(5, 3, 6, 6, generator=g, dtype=torch.float64)
    conv.train()
    noise.generator = torch.Generator().manual_seed(9)
    y = conv(x)
    # reference: same draws (V then U) applied to x_hat, then the affine
    ref_gen = torch.Generator().manual_seed(9)
    x_hat = F.conv2d(x, conv.normalized_weight().detach())
    v = torch.randn(5, 4, 1, 1, generator=ref_gen, dtype=torch.float64) * 0.3
    u = 1 + torch.randn(5, 4, 1, 1, generator=ref_gen, dtype=torch.float64) * 0.2
    ref = (x_hat + v) * u * conv.scale.detach()[None, :, None, None]
    ref = ref + conv.bias.detach()[None, :, None, None]
    torch.testing.assert_close(y, ref)
    conv.eval()
    plain = (
        x_hat * conv.scale.detach()[None, :, None, None] + conv.bias.detach()[None, :, None, None]
    )
    torch.testing.assert_close(conv(x), plain)


def test_wn_propagate_moments():
    conv = WNConv2d(2, 3, 1).double()
    m = torch.tensor([0.5, -1.0], dtype=torch.float64)
    v = torch.tensor([2.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        conv.scale.fill_(2.0)
        conv.bias.fill_(0.25)
    pm, pv = conv.propagate(m, v)
    w = conv.normalized_weight().detach()[:, :, 0, 0]
    torch.testing.assert_close(pm, 2.0 * (w @ m) + 0.25)
    torch.testing.assert_close(pv, 4.0 * ((w**2) @ v))
