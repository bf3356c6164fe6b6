"""The recorder against a float64 reference loop over the same batches."""

import copy

import numpy as np
import pytest
import torch
from naive import bn_inputs, naive_population
from torch import nn

from bnprobe.measure import find_bn_layers, measure
from bnprobe.models import AllCNN


def _model_and_data(seed=0):
    model = AllCNN(num_classes=3, in_channels=3, width=0.1, norm="bn")
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    g = torch.Generator().manual_seed(seed)
    return model, torch.randn(60, 3, 8, 8, generator=g) * 1.3 + 0.2


def _loop_stats(a):
    """Per-channel mean and biased variance with explicit float64 loops."""
    a = a.numpy().astype(np.float64)
    c = a.shape[1]
    mean, var = np.zeros(c), np.zeros(c)
    for ch in range(c):
        vals = a[:, ch].reshape(-1)
        mean[ch] = sum(vals) / len(vals)
        var[ch] = sum((v - mean[ch]) ** 2 for v in vals) / len(vals)
    return mean, var


def _replay_draws(n, batch_sizes, samples, seed):
    """The batch indices measure draws from a generator with this seed."""
    gen = torch.Generator().manual_seed(seed)
    torch.randint(2**62, (1,), generator=gen)  # the augmentation seed
    torch.randint(2**62, (1,), generator=gen)  # the reference pass's position seed
    return {k: [torch.randperm(n, generator=gen)[:k] for _ in range(samples)] for k in batch_sizes}


@pytest.mark.parametrize("mode", ["joint", "isolated"])
def test_recorder_matches_float64_reference_loop(mode):
    model, data = _model_and_data()
    result = measure(model, data, [4, 16], samples=3, mode=mode,
                     generator=torch.Generator().manual_seed(7))
    ref_model = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        pop = {n: (m.numpy(), v.numpy()) for n, (m, v) in naive_population(model, data).items()}
        if mode == "joint":
            for _, m in find_bn_layers(ref_model):
                m.train()
        else:
            for n, m in find_bn_layers(ref_model):
                m.running_mean.copy_(torch.from_numpy(pop[n][0]))
                m.running_var.copy_(torch.from_numpy(pop[n][1]))
        draws = _replay_draws(len(data), [4, 16], 3, seed=7)
        for k, batches in draws.items():
            for d, idx in enumerate(batches):
                inputs = bn_inputs(ref_model, data[idx].double())
                for li, (name, module) in enumerate(find_bn_layers(ref_model)):
                    mu, var = pop[name]
                    mean, s2 = _loop_stats(inputs[name])
                    v_ref = (mu - mean) / np.sqrt(var + module.eps)
                    u_ref = np.sqrt(var + module.eps) / np.sqrt(s2 + module.eps)
                    s = result.samples
                    got = s[(s["layer"] == name) & (s["batch_size"] == k) & (s["draw"] == d)
                            & (s["fraction"] == 1.0)].sort_values("channel")
                    assert got["layer_index"].iloc[0] == li
                    np.testing.assert_allclose(got["v"], v_ref, rtol=1e-3, atol=2e-5)
                    np.testing.assert_allclose(got["u"], u_ref, rtol=1e-3, atol=2e-5)
    for name in pop:
        ref_table = result.reference.query(f"layer == '{name}'").sort_values("channel")
        np.testing.assert_allclose(ref_table["mean"], pop[name][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ref_table["var"], pop[name][1], rtol=1e-5)


def test_spatial_fraction_uses_fewer_positions():
    model, data = _model_and_data()
    result = measure(model, data, [8], samples=40, spatial_fractions=[0.25],
                     generator=torch.Generator().manual_seed(1))
    s = result.samples.query("layer == 'features.0.norm'")
    var_full = s.query("fraction == 1.0").groupby("channel")["v"].var().mean()
    var_quarter = s.query("fraction == 0.25").groupby("channel")["v"].var().mean()
    assert var_quarter > 1.5 * var_full
    assert set(result.samples["fraction"]) == {0.25, 1.0}
