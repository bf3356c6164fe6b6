from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, special, stats

from bnprobe.stats import fit_neff, fit_neff_u, fit_neff_v
from bnprobe.stats.neff import _log_minus_digamma, _loglik, _stirling_phi, _u_stats, _v_stats

DRAWS, CHANNELS = 200, 32


def _model_samples(n: float, seed: int, d: int = DRAWS, c: int = CHANNELS) -> tuple[np.ndarray, np.ndarray]:
    """V ~ N(0, 1/n) and U = 1/sqrt(R), R ~ Gamma((n-1)/2, 2/n) (valid for any real n > 1)."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((d, c)) / np.sqrt(n)
    r = rng.gamma(0.5 * (n - 1.0), 2.0 / n, (d, c))
    return v, 1.0 / np.sqrt(r)


def _standard_errors(n: float, d: int = DRAWS, c: int = CHANNELS) -> tuple[float, float, float]:
    """Fisher standard errors of n_eff_v, n_eff_u and the joint n_eff at the truth n.

    Centred V: ``(nu/2) log n - n SS/2`` with ``nu = c (d-1)`` gives ``I = nu / (2 n^2)``.
    Dirichlet likelihood of U per channel: ``I(alpha) = d psi'(alpha) - d^2 psi'(d alpha)``,
    and ``dalpha/dn = 1/2``.
    """
    alpha = 0.5 * (n - 1.0)
    info_v = c * (d - 1) / (2.0 * n * n)
    info_u = 0.25 * c * (d * special.polygamma(1, alpha) - d * d * special.polygamma(1, d * alpha))
    return float(info_v**-0.5), float(info_u**-0.5), float((info_v + info_u) ** -0.5)


@pytest.mark.parametrize("n", [16, 128, 1024])
def test_iid_gaussian_batches_recover_n(n: int, bn_batches) -> None:
    se_v, se_u, se_joint = _standard_errors(n)
    for seed in range(3):
        v, u = bn_batches(n, seed=100 * n + seed)
        assert abs(fit_neff_v(v) - n) < 4 * se_v
        assert abs(fit_neff_u(u) - n) < 4 * se_u
        assert abs(fit_neff(v, u) - n) < 4 * se_joint


def test_standard_errors_match_simulation() -> None:
    # The Fisher SEs that set the tolerances above are the actual spread (and the mean is
    # unbiased to well within one SE) over 300 replications.
    n = 64.0
    se_v, se_u, se_joint = _standard_errors(n)
    fits = np.array([
        (fit_neff_v(v), fit_neff_u(u), fit_neff(v, u))
        for v, u in (_model_samples(n, seed=s) for s in range(300))
    ])
    sd = fits.std(axis=0, ddof=1)
    np.testing.assert_allclose(sd, [se_v, se_u, se_joint], rtol=0.15)
    bias = np.abs(fits.mean(axis=0) - n) / (sd / np.sqrt(len(fits)))
    assert (bias < 4).all()


@pytest.mark.parametrize("n", [2.0, 4.0, 37.5, 1e4, 1e7])
def test_model_samples_across_range(n: float) -> None:
    v, u = _model_samples(n, seed=int(n * 10) % 9973)
    se_v, se_u, se_joint = _standard_errors(n)
    assert abs(fit_neff_v(v) - n) < 4 * se_v
    assert abs(fit_neff_u(u) - n) < 4 * se_u
    assert abs(fit_neff(v, u) - n) < 4 * se_joint


def test_bias_of_v_and_scale_of_u_do_not_change_n_eff(bn_batches) -> None:
    n = 512
    v, u = bn_batches(n, seed=1)
    base = fit_neff_v(v), fit_neff_u(u), fit_neff(v, u)
    shifted = fit_neff_v(v + 0.15), fit_neff_u(u * 1.1), fit_neff(v + 0.15, u * 1.1)
    np.testing.assert_allclose(shifted, base, rtol=1e-9)
    # Per-channel biases and scales are removed as well.
    rng = np.random.default_rng(2)
    per_channel = fit_neff(v + rng.normal(0, 0.2, CHANNELS), u * rng.uniform(0.8, 1.3, CHANNELS))
    assert per_channel == pytest.approx(base[2], rel=1e-9)
    # The uncentred estimate 1/mean(v^2) would be 1/(1/n + 0.15^2) ~ 42.
    assert abs(base[0] - n) < 4 * _standard_errors(n)[0]


def test_fit_neff_v_closed_form_and_nan() -> None:
    v = np.array([[0.1, 1.0], [-0.2, 1.5], [0.3, np.nan], [np.nan, 0.5]])
    ss = np.sum((np.array([0.1, -0.2, 0.3]) - 0.2 / 3) ** 2) + np.sum((np.array([1.0, 1.5, 0.5]) - 1.0) ** 2)
    assert fit_neff_v(v) == pytest.approx((2 + 2) / ss, rel=1e-12)
    one = np.array([0.1, -0.2, 0.3])  # 1-D: one channel
    assert fit_neff_v(one) == pytest.approx(1.0 / np.var(one, ddof=1), rel=1e-12)
    assert fit_neff_v(np.ones((5, 3))) == float("inf")


def _dirichlet_reference(u: np.ndarray) -> float:
    """n_eff maximizing scipy's Dirichlet log-density of r/sum(r) per channel (brute force)."""
    r = 1.0 / u**2
    x = r / r.sum(axis=0)

    def nll(log_m: float) -> float:
        alpha = 0.5 * (np.exp(log_m) - 1.0)
        return -sum(stats.dirichlet.logpdf(x[:, c], np.full(x.shape[0], alpha)) for c in range(x.shape[1]))

    grid = np.linspace(np.log(1.5), np.log(1e6), 60)
    best = grid[np.argmin([nll(t) for t in grid])]
    res = optimize.minimize_scalar(nll, bounds=(best - 0.3, best + 0.3), method="bounded",
                                   options={"xatol": 1e-9})
    return float(np.exp(res.x))


def _joint_reference(v: np.ndarray, u: np.ndarray) -> float:
    """Brute-force joint fit: n SS_v ~ chi^2_nu (centred V) plus the Dirichlet likelihood of U."""
    ss = float(np.sum((v - v.mean(axis=0)) ** 2))
    nu = v.shape[1] * (v.shape[0] - 1)
    r = 1.0 / u**2
    x = r / r.sum(axis=0)

    def nll(log_m: float) -> float:
        m = np.exp(log_m)
        ll_v = np.log(m) + stats.chi2.logpdf(m * ss, nu)
        a = np.full(x.shape[0], 0.5 * (m - 1.0))
        return -(ll_v + sum(stats.dirichlet.logpdf(x[:, c], a) for c in range(x.shape[1])))

    res = optimize.minimize_scalar(nll, bounds=(np.log(2.0), np.log(1e4)), method="bounded",
                                   options={"xatol": 1e-9})
    return float(np.exp(res.x))


def test_fits_match_brute_force_likelihoods() -> None:
    v, u = _model_samples(50.0, seed=5, d=40, c=4)
    assert fit_neff_u(u) == pytest.approx(_dirichlet_reference(u), rel=1e-5)
    assert fit_neff(v, u) == pytest.approx(_joint_reference(v, u), rel=1e-5)
    # The root is the maximum of the module's own log-likelihood.
    vs, us = _v_stats(v), _u_stats(u)
    best = fit_neff(v, u)
    ll = _loglik(np.array([best * 0.99, best, best * 1.01]), vs, us)
    assert ll[1] > ll[0] and ll[1] > ll[2]


def test_profile_equation_would_be_biased() -> None:
    # The plain gamma-shape profile equation log(a) - psi(a) = mean s_c over-estimates n by
    # ~d/(d-1) with few draws per channel; the fitted (Dirichlet) equation does not.
    n, d, reps = 100.0, 10, 200
    plain, fitted = [], []
    for seed in range(reps):
        _, u = _model_samples(n, seed=seed, d=d, c=16)
        s = float(np.mean(_u_stats(u).s))
        a = np.exp(optimize.brentq(lambda t, s=s: _log_minus_digamma(np.array([np.exp(t)]))[0] - s, -5, 20))
        plain.append(2 * a + 1)
        fitted.append(fit_neff_u(u))
    se = np.std(fitted) / np.sqrt(reps)
    assert abs(np.mean(fitted) - n) < 4 * se
    assert np.mean(plain) / n - 1 > 0.08  # ~ +11%


def test_special_functions() -> None:
    x = np.array([1e-6, 0.3, 1.0, 9.99, 10.0, 37.0, 1e3])
    np.testing.assert_allclose(
        _stirling_phi(x), special.gammaln(x) - (x - 0.5) * np.log(x) + x - 0.5 * np.log(2 * np.pi),
        rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(_log_minus_digamma(x), np.log(x) - special.digamma(x), rtol=1e-9)
    # Large x: ~1/(2x) to full precision where log(x) - psi(x) would cancel.
    assert _log_minus_digamma(np.array([1e8]))[0] == pytest.approx(0.5e-8 + 1 / 12e16, rel=1e-14)


def test_bounds_and_errors() -> None:
    v, u = _model_samples(500.0, seed=3)
    assert fit_neff(v, u, n_max=100.0) == pytest.approx(100.0)
    assert fit_neff_u(u, n_max=100.0) == pytest.approx(100.0)
    assert fit_neff_u(np.ones((4, 2))) == pytest.approx(1e8)  # no spread: the upper bound
    assert fit_neff(v, None) == pytest.approx(fit_neff_v(v), rel=1e-9)
    assert fit_neff(None, u) == pytest.approx(fit_neff_u(u), rel=1e-9)
    with pytest.raises(ValueError, match="2 or more"):
        fit_neff(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="2 or more"):
        fit_neff_u(np.array([np.nan, 1.0]))
    with pytest.raises(ValueError, match="2 or more"):
        fit_neff_v(np.ones((1, 5)))
    with pytest.raises(ValueError, match="n_max"):
        fit_neff(v, u, n_max=1.0)
    with pytest.raises(ValueError, match="2-D"):
        fit_neff_v(np.ones((2, 2, 2)))
