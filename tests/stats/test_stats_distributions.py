from __future__ import annotations

import mpmath
import numpy as np
import pytest
from scipy import integrate, stats

from bnprobe.stats import s2_ratio_distribution, u_distribution, u_moments, v_distribution
from bnprobe.stats.distributions import _A_SWITCH


def _mp_moments(n: float) -> tuple[float, float]:
    """Reference E[U], Var[U] at 50 digits: U = sqrt(n)/X, X ~ chi_{n-1}."""
    with mpmath.workdps(50):
        n = mpmath.mpf(n)
        k = n - 1
        e_inv_x = mpmath.exp(mpmath.loggamma((k - 1) / 2) - mpmath.loggamma(k / 2)) / mpmath.sqrt(2)
        mean = mpmath.sqrt(n) * e_inv_x
        var = n / (k - 2) - mean**2
        return float(mean), float(var)


# ---------------------------------------------------------------- u_distribution


@pytest.mark.parametrize("n", [5.0, 30.0, 500.0])
def test_u_cdf_matches_monte_carlo(n: float) -> None:
    dist = u_distribution(n)
    pvalues = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        samples = np.sqrt(n) / np.sqrt(rng.chisquare(n - 1, size=3000))
        pvalues.append(stats.kstest(samples, dist.cdf).pvalue)
    assert sum(p > 0.01 for p in pvalues) >= 5
    # The same check must reject a different n.
    rng = np.random.default_rng(99)
    wrong = np.sqrt(n) / np.sqrt(rng.chisquare(n - 1, size=3000))
    assert stats.kstest(wrong, u_distribution(0.7 * n).cdf).pvalue < 1e-6


@pytest.mark.parametrize("n", [2.5, 5.0, 30.0, 1000.0, 1e6])
def test_u_pdf_integrates_to_one(n: float) -> None:
    pdf = u_distribution(n).pdf
    total = integrate.quad(pdf, 0, 1)[0] + integrate.quad(pdf, 1, np.inf)[0]
    assert total == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("n", [4.0, 17.5, 300.0])
def test_u_pdf_is_derivative_of_cdf(n: float) -> None:
    dist = u_distribution(n)
    x = dist.ppf(np.linspace(0.05, 0.95, 7))
    h = 1e-6 * x
    numeric = (dist.cdf(x + h) - dist.cdf(x - h)) / (2 * h)
    np.testing.assert_allclose(dist.pdf(x), numeric, rtol=1e-6)


@pytest.mark.parametrize("n", [3.0, 10.0, 1e4])
def test_u_ppf_inverts_cdf(n: float) -> None:
    dist = u_distribution(n)
    q = np.array([1e-6, 0.01, 0.3, 0.5, 0.9, 0.999])
    np.testing.assert_allclose(dist.cdf(dist.ppf(q)), q, rtol=1e-9)
    x = dist.ppf(q)
    np.testing.assert_allclose(dist.ppf(dist.cdf(x)), x, rtol=1e-9)
    # Direct reference: P(U <= u) = P(chi^2_{n-1} >= n / u^2).
    np.testing.assert_allclose(dist.cdf(x), stats.chi2.sf(n / x**2, n - 1), rtol=1e-12)


def test_u_rvs_mean_var_consistent() -> None:
    dist = u_distribution(20.0)
    mean, var = u_moments(20.0)
    assert dist.mean() == pytest.approx(mean, rel=1e-12)
    assert dist.var() == pytest.approx(var, rel=1e-12)
    samples = dist.rvs(size=200_000, random_state=np.random.default_rng(3))
    assert samples.mean() == pytest.approx(mean, abs=5 * np.sqrt(var / samples.size))
    assert stats.kstest(samples[:5000], dist.cdf).pvalue > 1e-3
    assert np.isinf(u_distribution(2.5).var())


def test_u_distribution_rejects_bad_n() -> None:
    with pytest.raises(ValueError):
        u_distribution(1.0)


# ---------------------------------------------------------------- u_moments


@pytest.mark.parametrize("n", [4.0, 5.0, 10.0, 100.0, 1e3, 1e5, 1e7])
def test_u_moments_against_mpmath(n: float) -> None:
    mean, var = u_moments(n)
    ref_mean, ref_var = _mp_moments(n)
    assert abs(mean - ref_mean) / ref_mean < 1e-9
    assert abs(var - ref_var) / ref_var < 1e-6
    # The implementation is accurate to ~1e-15; the tighter bound catches cancellation
    # in Var[U] = n/(n-3) - E[U]^2 (~4e-9 relative error at n = 1e7 even with an exact mean).
    assert abs(mean - ref_mean) / ref_mean < 1e-12
    assert abs(var - ref_var) / ref_var < 1e-10


def test_u_moments_large_n_is_near_asymptote() -> None:
    # Var[U] ~ 1/(2n) + O(1/n^2): a cancelling formula would give garbage here.
    n = 1e7
    _, var = u_moments(n)
    assert var * 2 * n == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("n", [4.5, 6.0, 20.0, 60.0])
def test_u_moments_against_numerical_integration(n: float) -> None:
    pdf = u_distribution(n).pdf

    def moment(p: int) -> float:
        def f(u: float) -> float:
            return u**p * pdf(u)

        return (
            integrate.quad(f, 0, 1, epsabs=0, epsrel=1e-12)[0]
            + integrate.quad(f, 1, np.inf, epsabs=0, epsrel=1e-12, limit=200)[0]
        )

    mean, var = u_moments(n)
    m1, m2 = moment(1), moment(2)
    assert mean == pytest.approx(m1, rel=1e-8)
    assert var == pytest.approx(m2 - m1**2, rel=1e-5)


def test_u_moments_continuous_at_switch() -> None:
    n_switch = 2 * _A_SWITCH + 2  # a = (n-2)/2 crosses _A_SWITCH here
    for rel in (-1e-3, -1e-9, -1e-15, 0.0, 1e-15, 1e-9, 1e-3):
        n = n_switch * (1 + rel)
        mean, var = u_moments(n)
        ref_mean, ref_var = _mp_moments(n)
        assert abs(mean - ref_mean) / ref_mean < 1e-14
        assert abs(var - ref_var) / ref_var < 1e-13


def test_u_moments_arrays_and_validation() -> None:
    n = np.array([[4.0, 100.0], [1e5, 1e7]])
    mean, var = u_moments(n)
    assert mean.shape == var.shape == (2, 2)
    assert var[1, 1] == pytest.approx(u_moments(1e7)[1], rel=1e-15)
    assert isinstance(u_moments(10.0)[0], float)
    for bad in (3.0, 2.0, np.array([5.0, 3.0]), np.nan):
        with pytest.raises(ValueError):
            u_moments(bad)


# ---------------------------------------------------------------- V and S^2


def test_v_distribution() -> None:
    dist = v_distribution(25.0)
    assert dist.mean() == 0.0
    assert dist.std() == pytest.approx(0.2)


def test_s2_ratio_distribution_nominal_and_scaled() -> None:
    n = 40.0
    nominal = s2_ratio_distribution(n)
    assert nominal.mean() == pytest.approx(n - 1)
    assert nominal.var() == pytest.approx(2 * (n - 1))
    n_eff = 12.5  # non-integer allowed
    scaled = s2_ratio_distribution(n, n_eff)
    # n S^2/sigma^2 = (n/n_eff) * chi2(n_eff - 1)
    assert scaled.mean() == pytest.approx(n / n_eff * (n_eff - 1))
    assert scaled.var() == pytest.approx((n / n_eff) ** 2 * 2 * (n_eff - 1))
    x = np.array([5.0, 30.0, 60.0])
    np.testing.assert_allclose(scaled.cdf(x), stats.chi2.cdf(x * n_eff / n, n_eff - 1))
    with pytest.raises(ValueError):
        s2_ratio_distribution(1.0)
    with pytest.raises(ValueError):
        s2_ratio_distribution(10.0, 0.5)
