from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from bnprobe.noise import InjectedNoise, Sampler, mc_average, mc_log_probs


def test_mc_average_is_probability_space():
    eps = 1e-6
    logp = torch.tensor(
        [[[1 - eps, eps]], [[eps, 1 - eps]]], dtype=torch.float64
    ).log()  # (S=2, N=1, K=2)
    out = mc_average(logp)
    assert out.shape == (1, 2)
    assert out.exp()[0].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)
    # the mean of log-probs gives exp(mean) = sqrt(eps * (1 - eps)) ~ 1e-3 per class instead
    mean_log = logp.mean(0).exp()[0]
    assert mean_log.tolist() == pytest.approx([1e-3, 1e-3], rel=1e-3)


def test_mc_average_matches_numpy():
    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(7, 5, 3, generator=gen), dim=-1)
    expected = np.log(np.exp(logp.double().numpy()).mean(axis=0))
    out = mc_average(logp)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_mc_average_stable_for_very_negative():
    logp = torch.tensor([[[-1000.0, 0.0]], [[-1002.0, 0.0]]], dtype=torch.float64)
    out = mc_average(logp)
    assert torch.isfinite(out).all()
    expected = -1000.0 + np.log((1 + np.exp(-2.0)) / 2)
    assert out[0, 0].item() == pytest.approx(expected, rel=1e-12)
    assert out[0, 1].item() == pytest.approx(0.0, abs=1e-12)


class _Dropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return torch.log_softmax(self.lin(self.drop(x)), dim=1)


class _DropoutSampler(Sampler):
    """Dropout on as the model's randomness (a sampler that is not one of bnprobe's)."""

    kind = "dropout"

    def __init__(self):
        self.calls = 0

    @contextlib.contextmanager
    def sampling(self, model):
        was = model.training
        model.train()
        try:
            yield self._resample
        finally:
            model.train(was)

    def _resample(self):
        self.calls += 1


def test_mc_log_probs_equals_mc_average_of_the_same_samples_and_restores_mode():
    model = _Dropout().eval()
    batches = [torch.randn(6, 4), torch.randn(3, 4)]
    sampler = _DropoutSampler()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append((m.training, o.requires_grad)))
    torch.manual_seed(0)
    out = mc_log_probs(model, lambda: batches, sampler, [20, 5])
    assert sorted(out) == [5, 20] and out[20].shape == (9, 3)
    assert len(calls) == 40 and sampler.calls == 20  # every batch per sample, one resample each
    assert all(training and not grad for training, grad in calls)
    assert not model.training
    torch.manual_seed(0)  # the same draws, stacked: sample s is one pass over all batches
    with torch.no_grad():
        model.train()
        samples = torch.stack([torch.cat([model(x) for x in batches]) for _ in range(20)])
        model.eval()
    torch.testing.assert_close(out[20], mc_average(samples), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[5], mc_average(samples[:5]), rtol=1e-6, atol=1e-6)
    assert out[20].exp().sum(1).tolist() == pytest.approx([1.0] * 9, abs=1e-5)
    with pytest.raises(ValueError, match=">= 1"):
        mc_log_probs(model, lambda: batches, sampler, [0])


def test_mc_log_probs_of_a_model_without_randomness_is_its_single_pass():
    from bnprobe.models import AllCNN

    zeros = [[0.0] * c for c in _channels()]
    model = AllCNN(num_classes=3, width=0.1, norm="wn", noise={"sigma_v": zeros, "sigma_u": zeros})
    model.eval()
    x = torch.randn(5, 3, 8, 8)
    out = mc_log_probs(model, lambda: [x], InjectedNoise(), [3])[3]
    torch.testing.assert_close(out, model(x).detach(), rtol=1e-5, atol=1e-6)


def _channels():
    from bnprobe.models.allcnn import layer_channels

    return layer_channels(3, 0.1)
