import copy

import pytest
import torch
from torch import nn

from bnprobe.data import DeviceImages, Normalization
from bnprobe.errors import BnprobeError
from bnprobe.models import AllCNN
from bnprobe.noise import MCBN, FixedNoise, InjectedNoise, ParametricBN
from bnprobe.norms import NoisyBatchNorm2d


def _state(model):
    return (
        {n: m.training for n, m in model.named_modules()},
        {n: b.clone() for n, b in model.named_buffers()},
    )


def _same(model, snap):
    flags, bufs = _state(model)
    return (
        flags == snap[0]
        and all(torch.equal(bufs[k], snap[1][k]) for k in bufs)
        and all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    )


def test_mcbn_normalizes_with_a_training_batch_and_restores_the_model():
    model = AllCNN(num_classes=3, width=0.1)
    model.train()
    snap = _state(model)
    train = torch.randn(32, 3, 8, 8) * 2 + 1
    test = torch.randn(5, 3, 8, 8)
    chosen = []

    def draw():
        idx = torch.randperm(32)[:8]
        chosen.append(idx)
        return train[idx]

    with MCBN(draw).sampling(model) as resample:
        resample()
        got = model(test)
        assert not model.training
    # reference: the test inputs normalized with the batch statistics of the same training batch
    ref = AllCNN(num_classes=3, width=0.1)
    ref.load_state_dict(model.state_dict())
    ref.train()
    stats = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, inp, n=n: stats.__setitem__(n, torch.var_mean(inp[0], dim=(0, 2, 3), correction=0))
        )
        for n, m in ref.named_modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        ref(train[chosen[0]])
        for h in hooks:
            h.remove()
        ref.eval()
        for n, m in ref.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.copy_(stats[n][0])
                m.running_mean.copy_(stats[n][1])
        assert torch.allclose(got, ref(test), atol=1e-5)
    assert _same(model, snap)


def _trained_bn(channels=4, seed=0):
    """A BN layer with non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(channels, generator=g))
        bn.bias.copy_(torch.randn(channels, generator=g))
    return bn.eval()


def test_parametric_bn_equals_noisy_batchnorm_with_fixed_noise_bit_for_bit():
    bn = _trained_bn()
    sv, su = torch.tensor([0.1, 0.3, 0.0, 0.5]), torch.tensor([0.2, 0.05, 0.4, 0.0])
    noisy = NoisyBatchNorm2d(4, FixedNoise(4, sv, su))
    noisy.load_state_dict(bn.state_dict(), strict=False)
    x = torch.randn(16, 4, 3, 3, generator=torch.Generator().manual_seed(1)) * 2 + 1
    model = nn.Sequential(bn)
    with torch.no_grad(), ParametricBN([(sv, su)], torch.Generator().manual_seed(7)).sampling(model):
        got = model(x)
    noisy.eval()
    with torch.no_grad(), InjectedNoise(torch.Generator().manual_seed(7)).sampling(noisy):
        want = noisy(x)
    assert torch.equal(got, want)  # bit for bit
    assert not torch.allclose(got, bn(x))  # and the scale and noise matter


def test_parametric_bn_draws_noise_of_the_requested_size_and_restores():
    bn = _trained_bn()
    model = nn.Sequential(bn)
    snap = _state(model)
    sv, su = torch.full((4,), 0.1), torch.full((4,), 0.2)
    x = torch.randn(20000, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        shape = (1, -1, 1, 1)
        x_hat = (x - bn.running_mean.view(shape)) / (bn.running_var + bn.eps).sqrt().view(shape)
        with ParametricBN([(sv, su)], torch.Generator().manual_seed(0)).sampling(model):
            y = model(x)
    w, b = bn.weight[None, :, None, None], bn.bias[None, :, None, None]
    z = (y - b) / w  # (x_hat + V) * U with V, U shared over positions
    # E[z | x_hat] = x_hat and Var[z | x_hat] = sv^2 (1 + su^2) + x_hat^2 su^2 per channel
    resid = (z - x_hat).detach()
    pred_var = 0.01 * (1 + 0.04) + x_hat.square() * 0.04
    standardized = resid / pred_var.sqrt()
    assert abs(float(standardized.mean())) < 0.02
    assert abs(float(standardized.square().mean()) - 1) < 0.03
    assert _same(model, snap)
    with (
        pytest.raises(BnprobeError, match="channels"),
        ParametricBN([(torch.ones(3), torch.ones(3))]).sampling(model),
    ):
        pass


def test_injected_noise_restores_flags_generators_and_training_mode():
    model = AllCNN(num_classes=3, width=0.1, norm="wn", noise={"sigma_v": [[0.1] * c for c in _channels()],
                                                             "sigma_u": [[0.1] * c for c in _channels()]})
    model.train()
    before = copy.deepcopy(model.state_dict())
    with InjectedNoise(torch.Generator().manual_seed(0)).sampling(model) as resample:
        resample()
        assert not model.training
    assert model.training and all(m.training for m in model.modules())
    from bnprobe.noise import noise_modules

    assert all(not m.mc and m.generator is None for m in noise_modules(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(BnprobeError, match="no noise"), InjectedNoise().sampling(nn.Linear(2, 2)):
        pass


def _channels():
    from bnprobe.models.allcnn import layer_channels

    return layer_channels(3, 0.1)


def test_evaluate_model_mc_for_deterministic_model_runs_once():
    from bnprobe.evaluation.run import evaluate_model

    model = AllCNN(num_classes=3, in_channels=3, width=0.1, norm="none")
    norm = Normalization([0.5] * 3, [0.25] * 3, 0, False)
    imgs = DeviceImages(
        torch.randint(0, 255, (40, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 3, (40,)), norm
    )
    notes = []
    metrics, coverage, rob = evaluate_model(model, imgs, imgs, mc=[10], log=notes.append)
    assert metrics["mc_mode"] == "deterministic" and "mc1" in metrics and "N = 1" in notes[0]
    full = coverage.query("method == 'single' and coverage == 1.0")
    assert full["error"].iloc[0] == pytest.approx(1 - metrics["single"]["accuracy"])
    assert rob is None
