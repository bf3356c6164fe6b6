from __future__ import annotations

import numpy as np

from bnprobe.stats import ks_s2_ratio, ks_v


def _samples(n_true: float, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(size) / np.sqrt(n_true)
    u = 1.0 / np.sqrt(rng.chisquare(n_true - 1, size) / n_true)
    return v, u


def test_ks_passes_on_model_samples() -> None:
    p_s2, p_v = [], []
    for seed in range(10):
        v, u = _samples(50.0, 2_000, seed)
        p_s2.append(ks_s2_ratio(u, 50.0)[1])
        p_v.append(ks_v(v, 50.0)[1])
    assert sum(p > 0.01 for p in p_s2) >= 8
    assert sum(p > 0.01 for p in p_v) >= 8


def test_ks_fails_on_wrong_n() -> None:
    for seed in range(5):
        v, u = _samples(50.0, 2_000, seed)
        stat, p = ks_s2_ratio(u, 100.0)
        assert p < 1e-4 and stat > 0.05
        assert ks_v(v, 100.0)[1] < 1e-4


def test_ks_with_effective_sample_size() -> None:
    # Batch of n = 100 values that behaves like n_eff = 20 independent ones.
    n, n_eff = 100.0, 20.0
    passes = 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        ratio = rng.chisquare(n_eff - 1, 2_000) / n_eff  # S^2 / sigma^2
        u = 1.0 / np.sqrt(ratio)
        passes += ks_s2_ratio(u, n, n_eff)[1] > 0.01
        assert ks_s2_ratio(u, n)[1] < 1e-4
    assert passes >= 8


def test_ks_drops_non_finite() -> None:
    _, u = _samples(30.0, 500, 0)
    with_nan = np.append(u, [np.nan, np.inf])
    assert ks_s2_ratio(with_nan, 30.0) == ks_s2_ratio(u, 30.0)
