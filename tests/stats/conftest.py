"""Synthetic BN samples for the stats tests: V and U computed from real batches of data."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import pytest


def batch_samples(n: int, seed: int, d: int = 200, c: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """V and U (draws x channels) of d x c batches of n i.i.d. N(mu_c, sigma_c^2) values each.

    ``M, S`` are a batch's mean and (biased, as in BN) standard deviation, and
    ``V = (mu - M)/sigma``, ``U = sigma/S``: exactly ``N(0, 1/n)`` and ``sqrt(n)/chi_{n-1}``.
    """
    rng = np.random.default_rng(seed)
    mu = rng.normal(0.0, 3.0, c)
    sigma = rng.uniform(0.5, 2.0, c)
    v = np.empty((d, c))
    u = np.empty((d, c))
    for i in range(d):  # one draw at a time keeps the memory at c * n values
        x = mu[:, None] + sigma[:, None] * rng.standard_normal((c, n))
        v[i] = (mu - x.mean(axis=1)) / sigma
        u[i] = sigma / x.std(axis=1)
    return v, u


def tidy(v: np.ndarray, u: np.ndarray, batch_size: int, spatial_size: int, layer: str = "conv",
         index: int = 0, fraction: float = 1.0) -> pd.DataFrame:
    """The tidy samples table of one (layer, batch size, fraction) from draws x channels arrays."""
    d, c = v.shape
    draw, channel = np.meshgrid(np.arange(d), np.arange(c), indexing="ij")
    return pd.DataFrame({
        "layer": layer, "layer_index": index, "channel": channel.ravel(), "batch_size": batch_size,
        "spatial_size": spatial_size, "fraction": fraction, "draw": draw.ravel(),
        "v": v.ravel(), "u": u.ravel(),
    })


@pytest.fixture
def bn_batches() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """:func:`batch_samples`: V, U of real Gaussian batches of n values."""
    return batch_samples


@pytest.fixture
def tidy_table() -> Callable[..., pd.DataFrame]:
    """:func:`tidy`: a tidy samples table from draws x channels arrays."""
    return tidy
