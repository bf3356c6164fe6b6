from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from bnprobe.evaluation import mc_average, mc_predict


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


@contextlib.contextmanager
def _train_mode(model):
    was = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was)


def test_mc_predict_averages_and_restores_mode():
    torch.manual_seed(0)
    model = _Dropout().eval()
    x = torch.randn(6, 4)
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append((m.training, o.requires_grad)))
    out = mc_predict(model, x, n_samples=20, enable_mc=_train_mode)
    assert out.shape == (6, 3)
    assert len(calls) == 20
    assert all(training and not grad for training, grad in calls)
    assert not model.training
    assert out.exp().sum(1).tolist() == pytest.approx([1.0] * 6, abs=1e-5)


def test_mc_predict_deterministic_model_equals_single_pass():
    model = _Dropout().eval()
    x = torch.randn(5, 4)
    out = mc_predict(model, x, n_samples=3, enable_mc=lambda m: contextlib.nullcontext())
    torch.testing.assert_close(out, model(x).detach(), rtol=1e-5, atol=1e-6)
