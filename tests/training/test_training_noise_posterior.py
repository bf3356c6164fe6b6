"""Learned noise reaches the exact posterior of a conjugate model through the real optimizer set-up."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnprobe.noise.modules import LearnedNoise
from bnprobe.noise.network import learned_noise_parameters
from bnprobe.training import TrainConfig
from bnprobe.training.config import lr_factor
from bnprobe.training.setup import NOISE_GROUP, make_optimizer, step_hooks

N, TAU, PRIOR, S_TRUE = 400, 2.0, 10.0, 1.5


class _OneChannel(nn.Module):
    """``y_hat = x * S`` with ``S ~ N(s, sigma_S^2)`` drawn per sample (a LearnedNoise, bias 0)."""

    def __init__(self, sigma0: float) -> None:
        super().__init__()
        self.noise = LearnedNoise(1, init_sigma=sigma0, prior_std=PRIOR)
        self.noise.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.noise(x)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 1, generator=g)
    return x, S_TRUE * x + TAU * torch.randn(N, 1, generator=g)


@pytest.mark.parametrize("sigma0", [0.01, 0.3])
def test_learned_sigma_reaches_the_conjugate_posterior(sigma0):
    """y = S x + N(0, tau^2), prior S ~ N(1, p^2): q(S) = N(s, sigma^2) is exact at the optimum of
    the ELBO, with sigma*^2 = 1 / (sum x^2 / tau^2 + 1 / p^2) and s* the posterior mean.

    The loss is bnprobe's: the batch mean of the NLL with one draw of S per sample plus
    KL / |D| (``step_hooks``), minimized by ``make_optimizer``'s noise group (Adam at its
    default rate) under the run's schedule (the rate falls tenfold by the last epoch).
    """
    x, y = _data()
    precision = float((x * x).sum()) / TAU**2 + 1.0 / PRIOR**2
    sigma_star = 1.0 / math.sqrt(precision)
    s_star = (float((x * y).sum()) / TAU**2 + 1.0 / PRIOR**2) / precision
    torch.manual_seed(1)
    model = _OneChannel(sigma0)
    config = TrainConfig(norm="an", learn_noise="channel", project=False, epochs=100).validate()
    optimizer = make_optimizer(model, config, lr=0.005)
    (group,) = optimizer.param_groups
    assert group["name"] == NOISE_GROUP and group["weight_decay"] == 0
    assert {id(p) for p in group["params"]} == {id(p) for p in learned_noise_parameters(model)}
    _, regularizer = step_hooks(model, config, N)  # KL / |D|, as in training
    batch = 40
    for epoch in range(config.epochs):
        for g in optimizer.param_groups:  # as training.loop does
            g["lr"] = g["initial_lr"] * lr_factor(config, epoch)
        for start in range(0, N, batch):
            xb, yb = x[start : start + batch], y[start : start + batch]
            nll = ((yb - model(xb)) ** 2).mean() / (2 * TAU**2)  # one draw of S per sample
            loss = nll + regularizer()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    sigma = float(model.noise.sigma().detach())
    assert sigma == pytest.approx(sigma_star, rel=0.1), (sigma0, sigma, sigma_star)
    assert float(model.noise.scale.detach()) == pytest.approx(s_star, abs=0.5 * sigma_star)
