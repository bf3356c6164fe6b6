"""All-CNN with every normalization and noise: invariances, batch independence, noise, MC mode."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnprobe.errors import BnprobeError
from bnprobe.models import AllCNN
from bnprobe.models.allcnn import layer_channels
from bnprobe.noise import InjectedNoise
from bnprobe.noise.modules import FixedNoise, LearnedNoise
from bnprobe.noise.network import learned_noise_modules, noise_modules, set_noise_generator
from bnprobe.norms.an import ANConv2d, InputMoments
from bnprobe.norms.projection import project_scale_invariant_, scale_invariant_weights
from bnprobe.norms.wn import WNConv2d

CHANNELS = layer_channels(4, 0.25)


def _noise(sv=0.2, su=0.1, per_channel=False):
    def values(base, c):
        return [base * (1 + i / c) for i in range(c)] if per_channel else [base] * c
    return {"sigma_v": [values(sv, c) for c in CHANNELS], "sigma_u": [values(su, c) for c in CHANNELS],
            "scale": 1.0}


def _model(norm, **kw):
    torch.manual_seed(0)
    model = AllCNN(num_classes=4, width=0.25, norm=norm, **kw).double()
    if norm == "an":
        model.input_moments.set_(torch.tensor([0.1, -0.2, 0.05]), torch.tensor([0.9, 1.1, 1.0]))
    return model


def _x(n=6, size=8, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_structure_of_each_norm():
    assert sum(isinstance(m, WNConv2d) for m in _model("wn").modules()) == 9
    an = _model("an")
    assert sum(isinstance(m, ANConv2d) for m in an.modules()) == 9
    assert isinstance(an.input_moments, InputMoments)
    assert {"input_moments.mean", "input_moments.var"} <= set(an.state_dict())
    assert _model("wn").input_moments is None
    assert len(noise_modules(_model("wn", noise=_noise()))) == 9
    learned = _model("an", learn_noise="channel")
    assert len(learned_noise_modules(learned)) == 9
    # a LearnedNoise brings the affine: the AN layer has none
    first = learned.features[0].conv
    assert first.scale is None and first.bias is None
    with pytest.raises(BnprobeError, match="normalization"):
        AllCNN(norm="none", learn_noise="layer")


@pytest.mark.parametrize("norm,kw", [("wn", {}), ("an", {}), ("wn", {"noise": _noise()}),
                                     ("an", {"learn_noise": "channel"})])
def test_outputs_invariant_to_scaling_w(norm, kw):
    model = _model(norm, **kw).eval()
    x = _x()
    ref = model(x)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for w in scale_invariant_weights(model):
            factor = torch.rand(w.shape[0], generator=g, dtype=w.dtype) * 4 + 1
            w.mul_(factor.reshape((-1,) + (1,) * (w.dim() - 1)))
    tol = 1e-4 if norm == "an" else 1e-9  # AN: eps in sqrt(var + eps) breaks exactness slightly
    torch.testing.assert_close(model(x), ref, rtol=tol, atol=tol)
    with torch.no_grad():  # the test can fail: a sign flip is not an invariance
        scale_invariant_weights(model)[1][0].mul_(-1.0)
    assert not torch.allclose(model(x), ref, rtol=1e-4, atol=1e-4)


def test_an_batch_size_1_equals_64_and_train_equals_eval():
    model = _model("an")
    x = _x(64)
    full = model(x)
    singles = torch.cat([model(x[i : i + 1]) for i in range(0, 64, 7)])
    torch.testing.assert_close(singles, full[::7], rtol=1e-10, atol=1e-10)
    model.eval()
    torch.testing.assert_close(model(x), full, rtol=1e-12, atol=1e-12)
    # a BN net is batch dependent in training mode (sanity check of the test)
    bn = _model("bn")
    assert not torch.allclose(bn(x[:2])[0], bn(x)[0])


def test_an_moments_follow_the_input_moments_buffer():
    model = _model("an").eval()
    x = _x()
    ref = model(x)
    model.input_moments.set_(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([4.0, 1.0, 1.0]))
    assert not torch.allclose(model(x), ref)


def _clean_and_noisy(model, x):
    """Output of the first block in training mode without and with its noise."""
    set_noise_generator(model, torch.Generator().manual_seed(5))
    block = model.features[0]
    noise = noise_modules(block)[0]
    with torch.no_grad():
        model(x[:2])  # AN: propagate the moments
        noise.noise_scale = 0.0
        clean = block(x)
        noise.noise_scale = 1.0
        noisy = block(x)
    affine = block.norm if isinstance(block.norm, nn.BatchNorm2d) else block.conv
    return clean, noisy, affine.weight if affine is block.norm else affine.scale, affine.bias


@pytest.mark.parametrize("norm", ["wn", "an", "bn"])
def test_fixed_noise_in_the_model_has_the_requested_channel_std(norm):
    noise = _noise(sv=0.3, su=0.0, per_channel=True)
    x = _x(4000, size=4)
    clean, noisy, scale, bias = _clean_and_noisy(_model(norm, noise=noise), x)
    v = ((noisy - clean) / scale.detach().reshape(1, -1, 1, 1)).reshape(4000, CHANNELS[0], -1)
    # V is shared by every spatial position of a sample and channel ...
    assert float((v - v[:, :, :1]).abs().max()) < 1e-9
    # ... and has the requested std per channel
    want = torch.tensor(noise["sigma_v"][0], dtype=torch.float64)
    torch.testing.assert_close(v[:, :, 0].std(dim=0), want, rtol=0.06, atol=0)
    # multiplicative part: U = (y_noisy - b) / (y_clean - b)
    clean, noisy, scale, bias = _clean_and_noisy(_model(norm, noise=_noise(sv=0.0, su=0.25)), x)
    b = bias.detach().reshape(1, -1, 1, 1)
    u = ((noisy - b) / (clean - b)).reshape(4000, CHANNELS[0], -1)
    assert float((u - u[:, :, :1]).abs().max()) < 1e-6
    torch.testing.assert_close(u[:, :, 0].std(dim=0), torch.full((CHANNELS[0],), 0.25, dtype=torch.float64),
                               rtol=0.06, atol=0)


@pytest.mark.parametrize("norm,kw", [("bn", {}), ("wn", {"noise": _noise()}), ("an", {"noise": _noise()}),
                                     ("an", {"learn_noise": "layer"}), ("bn", {"learn_noise": "channel"})])
def test_eval_is_deterministic_and_injected_noise_samples(norm, kw):
    model = _model(norm, **kw)
    x = _x()
    model(x)  # BN: update the running statistics once
    model.eval()
    a, b = model(x), model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    if norm == "bn" and not kw:
        return
    with InjectedNoise(torch.Generator().manual_seed(0)).sampling(model):
        assert all(m.mc for m in noise_modules(model))
        c, d = model(x), model(x)
    assert not torch.allclose(c, d) and not torch.allclose(c, a)
    assert not any(m.mc for m in noise_modules(model)) and not model.training
    assert all(m.generator is None for m in noise_modules(model))
    torch.testing.assert_close(model(x), a, rtol=0, atol=0)


def test_learned_noise_starts_from_fitted_sigma_u():
    noise = _noise(su=0.1, per_channel=True)
    per_channel = _model("wn", learn_noise="channel", noise=noise)
    first = learned_noise_modules(per_channel)[0]
    want = torch.tensor(noise["sigma_u"][0], dtype=torch.float64)
    torch.testing.assert_close(first.sigma().detach(), want, rtol=1e-6, atol=0)
    per_layer = learned_noise_modules(_model("wn", learn_noise="layer", noise=noise))[0]
    rms = want.square().mean().sqrt()
    torch.testing.assert_close(per_layer.sigma().detach(), rms.reshape(1), rtol=1e-6, atol=0)
    assert isinstance(learned_noise_modules(_model("an", learn_noise="layer"))[0], LearnedNoise)


def _sigmas(v, u, channels):
    return {"sigma_v": [[v] * c for c in channels], "sigma_u": [[u] * c for c in channels]}


@pytest.mark.parametrize("bad,match", [
    (_sigmas(0.1, 0.1, CHANNELS[:7]), "7 layers"),
    (_sigmas(0.1, 0.1, [c + 1 for c in CHANNELS]), "channels"),
    ({"sigma_v": [[-0.1] * c for c in CHANNELS], "sigma_u": [[0.1] * c for c in CHANNELS]}, "negative"),
    ({"sigma_v": [[float("nan")] * c for c in CHANNELS], "sigma_u": [[0.1] * c for c in CHANNELS]}, "finite"),
])
def test_noise_that_does_not_fit_the_network(bad, match):
    with pytest.raises(BnprobeError, match=match):
        AllCNN(num_classes=4, width=0.25, norm="wn", noise=bad)


def test_projection_and_deepcopy_keep_the_function():
    model = _model("wn", noise=_noise()).eval()
    x = _x()
    ref = model(x)
    project_scale_invariant_(model)
    for w in scale_invariant_weights(model):
        torch.testing.assert_close(w.flatten(1).norm(dim=1), torch.ones(w.shape[0], dtype=w.dtype))
    torch.testing.assert_close(model(x), ref)
    torch.testing.assert_close(copy.deepcopy(model)(x), ref)
    assert isinstance(model.features[0].norm, nn.Identity)
    assert all(isinstance(m, FixedNoise) for m in noise_modules(model))
