"""Monte Carlo prediction: average predictive distributions over stochastic forward passes."""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn

__all__ = ["EnableMC", "mc_average", "mc_predict"]

#: Context-manager factory: takes the model, returns a context manager that puts the model in
#: its stochastic prediction mode on entry and restores its previous mode on exit.
EnableMC = Callable[[nn.Module], contextlib.AbstractContextManager]


def mc_average(logp_samples: torch.Tensor) -> torch.Tensor:
    """Log of the mean predictive probability over samples (not the mean of log-probs).

    Computes ``log(1/S * sum_s exp(logp_s)) = logsumexp_s(logp_s) - log S`` in float64, which
    is stable for very negative log-probabilities.

    Args:
        logp_samples: Log-probabilities, shape ``(S, N, K)`` with ``S >= 1``.

    Returns:
        Log-probabilities of shape ``(N, K)`` with the input's dtype and device.
    """
    if logp_samples.dim() != 3 or logp_samples.shape[0] == 0:
        raise ValueError(f"expected (S, N, K) with S >= 1, got {tuple(logp_samples.shape)}")
    n_samples = logp_samples.shape[0]
    out = torch.logsumexp(logp_samples.double(), dim=0) - math.log(n_samples)
    return out.to(logp_samples.dtype)


def mc_predict(
    model: nn.Module, x: torch.Tensor, n_samples: int, enable_mc: EnableMC
) -> torch.Tensor:
    """Monte Carlo predictive distribution of a stochastic model.

    Runs ``model(x)`` ``n_samples`` times under ``torch.no_grad()`` inside
    ``enable_mc(model)`` and averages the predictions in probability space with
    :func:`mc_average`.

    ``enable_mc`` is a callable taking the model and returning a context manager that
    switches the model into its stochastic prediction mode (e.g. sampling noise in
    noisy-BN layers, or dropout on) and restores the previous mode on exit, e.g.::

        @contextlib.contextmanager
        def dropout_on(model):
            was_training = model.training
            model.train()
            try:
                yield
            finally:
                model.train(was_training)

    Args:
        model: Module mapping ``x`` to log-probabilities ``(N, K)``.
        x: Input batch on the model's device.
        n_samples: Number of forward passes (>= 1).
        enable_mc: Context-manager factory described above.

    Returns:
        Log of the mean predicted probability, shape ``(N, K)``.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    with torch.no_grad(), enable_mc(model):
        samples = torch.stack([model(x) for _ in range(n_samples)])
    return mc_average(samples)
