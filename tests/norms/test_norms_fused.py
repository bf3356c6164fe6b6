"""The fused WN/AN forward against the unfused definition, with and without noise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bnprobe.noise.modules import FixedNoise, LearnedNoise
from bnprobe.norms.an import ANConv2d
from bnprobe.norms.bn import NoisyBatchNorm2d
from bnprobe.norms.wn import WNConv2d

DT = torch.float64


def _noise(kind):
    if kind == "fixed":
        return FixedNoise(4, sigma_v=[0.1, 0.2, 0.3, 0.4], sigma_u=0.25, noise_scale=1.5)
    if kind == "learned":
        ln = LearnedNoise(4, init_sigma=0.3)
        with torch.no_grad():
            ln.scale.copy_(torch.tensor([0.5, 1.5, -1.0, 2.0]))
            ln.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        return ln
    return None


def _layer(norm, noise):
    affine = noise is None or not noise.provides_affine
    cls = WNConv2d if norm == "wn" else ANConv2d
    layer = cls(3, 4, 3, stride=2, padding=1, bias=affine, scale=affine, noise=noise).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if affine:
            layer.scale.copy_(torch.rand(4, generator=g, dtype=DT) + 0.5)
            layer.bias.copy_(torch.randn(4, generator=g, dtype=DT))
    if norm == "an":
        layer.propagate(torch.tensor([0.1, -0.2, 0.3], dtype=DT), torch.tensor([1.0, 2.0, 0.5], dtype=DT))
    return layer


def _reference(layer, x, noise_fn):
    if isinstance(layer, ANConv2d):
        mu, sigma = layer.normalizer_moments()
        y = F.conv2d(x, layer.weight, None, layer.stride, layer.padding)
        x_hat = (y - mu[None, :, None, None]) / sigma[None, :, None, None]
    else:
        x_hat = F.conv2d(x, layer.normalized_weight(), None, layer.stride, layer.padding)
    if noise_fn is not None:
        x_hat = noise_fn(x_hat)
    if layer.scale is not None:
        x_hat = x_hat * layer.scale[None, :, None, None] + layer.bias[None, :, None, None]
    return x_hat


@pytest.mark.parametrize("norm", ["wn", "an"])
@pytest.mark.parametrize("kind", [None, "fixed", "learned"])
@pytest.mark.parametrize("training", [True, False])
# output larger / smaller than the weight (factors on the output); at 2 and 1 the kernel taps
# that read only padding are cropped (the reference convolves with the whole kernel)
@pytest.mark.parametrize("size", [7, 2, 1])
def test_fused_forward_matches_definition(norm, kind, training, size):
    noise = _noise(kind)
    layer = _layer(norm, noise.double() if noise is not None else None)
    layer.train(training)
    x = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=DT)
    if noise is not None:
        noise.generator = torch.Generator().manual_seed(7)
    out = layer(x)
    if noise is not None:
        noise.generator = torch.Generator().manual_seed(7)  # the same draws for the reference
    ref = _reference(layer, x, noise)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # gradients agree too
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    params = list(layer.parameters())
    if noise is not None:
        noise.generator = torch.Generator().manual_seed(7)
    g1 = torch.autograd.grad((layer(x) * w).sum(), params, allow_unused=True)
    if noise is not None:
        noise.generator = torch.Generator().manual_seed(7)
    g2 = torch.autograd.grad((_reference(layer, x, noise) * w).sum(), params, allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_noisy_batchnorm_is_a_batchnorm_with_noise_before_the_affine():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, 5, 5, generator=g, dtype=DT) * 2 + 1
    noisy = NoisyBatchNorm2d(4, FixedNoise(4, 0.3, 0.2)).double()
    plain = torch.nn.BatchNorm2d(4).double()
    with torch.no_grad():
        for m in (noisy, plain):
            m.weight.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0]))
            m.bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    noisy.noise.generator = torch.Generator().manual_seed(4)
    out = noisy(x)
    plain(x)
    torch.testing.assert_close(noisy.running_mean, plain.running_mean)
    torch.testing.assert_close(noisy.running_var, plain.running_var)
    assert int(noisy.num_batches_tracked) == 1
    x_hat = F.batch_norm(x, None, None, training=True, eps=noisy.eps)
    ref_noise = FixedNoise(4, 0.3, 0.2, generator=torch.Generator().manual_seed(4)).double()
    ref = ref_noise(x_hat) * noisy.weight[None, :, None, None] + noisy.bias[None, :, None, None]
    torch.testing.assert_close(out, ref)
    noisy.eval()
    plain.eval()
    torch.testing.assert_close(noisy(x), plain(x))
    assert not NoisyBatchNorm2d(4, LearnedNoise(4)).affine
