from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, stats

from bnprobe.stats import fit_neff, fit_neff_u, fit_neff_v


def _model_samples(n_eff: float, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(size) / np.sqrt(n_eff)
    ratio = rng.chisquare(n_eff - 1, size) / n_eff  # S^2 / sigma^2
    return v, 1.0 / np.sqrt(ratio)


def _reference_fit(v: np.ndarray | None, u: np.ndarray | None) -> float:
    """Brute-force ML with scipy's own log-densities (slow but obviously right)."""

    def nll(log_m: float) -> float:
        m = np.exp(log_m)
        total = 0.0
        if v is not None:
            total += stats.norm.logpdf(v, scale=1 / np.sqrt(m)).sum()
        if u is not None:
            total += stats.gamma.logpdf(1 / u**2, a=(m - 1) / 2, scale=2 / m).sum()
        return -total

    grid = np.linspace(np.log(1.5), np.log(1e6), 60)
    best = grid[np.argmin([nll(t) for t in grid])]
    res = optimize.minimize_scalar(nll, bounds=(best - 0.3, best + 0.3), method="bounded")
    return float(np.exp(res.x))


@pytest.mark.parametrize("n_eff", [37.0, 500.0])
def test_fit_neff_recovers_truth(n_eff: float) -> None:
    v, u = _model_samples(n_eff, 20_000, seed=int(n_eff))
    assert fit_neff(v, u) == pytest.approx(n_eff, rel=0.03)
    assert fit_neff_u(u) == pytest.approx(n_eff, rel=0.04)
    assert fit_neff_v(v) == pytest.approx(n_eff, rel=0.04)


def test_fit_neff_non_integer_and_large() -> None:
    v, u = _model_samples(7.3, 20_000, seed=1)
    assert fit_neff(v, u) == pytest.approx(7.3, rel=0.03)
    v, u = _model_samples(2e5, 20_000, seed=2)
    assert fit_neff(v, u) == pytest.approx(2e5, rel=0.03)


def test_fit_neff_matches_brute_force_likelihood() -> None:
    v, u = _model_samples(50.0, 2_000, seed=5)
    assert fit_neff(v, u) == pytest.approx(_reference_fit(v, u), rel=1e-4)
    assert fit_neff_u(u) == pytest.approx(_reference_fit(None, u), rel=1e-4)
    assert fit_neff_v(v) == pytest.approx(_reference_fit(v, None), rel=1e-4)


def test_fit_neff_detects_wrong_n() -> None:
    # Samples generated with n_eff = 20 must not be fitted near a nominal n = 100.
    v, u = _model_samples(20.0, 5_000, seed=7)
    assert fit_neff(v, u) < 25.0


def test_fit_neff_v_closed_form() -> None:
    v = np.array([0.1, -0.2, 0.3, np.nan])
    assert fit_neff_v(v) == pytest.approx(1.0 / np.mean(np.array([0.1, -0.2, 0.3]) ** 2))


def test_fit_neff_bounds_and_errors() -> None:
    v, u = _model_samples(500.0, 5_000, seed=3)
    assert fit_neff(v, u, n_max=100.0) == pytest.approx(100.0, rel=1e-6)
    with pytest.raises(ValueError):
        fit_neff(np.array([]), np.array([]))
    with pytest.raises(ValueError):
        fit_neff_u(np.array([np.nan]))
    with pytest.raises(ValueError):
        fit_neff(v, u, n_max=1.0)
