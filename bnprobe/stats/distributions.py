"""Sampling distributions of the BN statistics under the Gaussian model (paper eq. 6).

With ``n`` values per channel, ``V = (mu - M) / sigma ~ N(0, 1/n)``,
``n S^2 / sigma^2 ~ chi^2_{n-1}`` and ``U = sigma / S ~ sqrt(n) / chi_{n-1}``.
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np
from scipy import stats

ArrayLike = Union[float, np.ndarray]

# Coefficients c_j of D(a) = lgamma(a + 1/2) - lgamma(a) - log(a)/2 ~ sum_j c_j / a^(2j-1),
# c_j = (2^(1-k) - 2) B_k / (k (k-1)) for k = 2j (Bernoulli numbers B_k).
_D_SERIES = (
    -1.0 / 8.0,
    1.0 / 192.0,
    -1.0 / 640.0,
    17.0 / 14336.0,
    -31.0 / 18432.0,
    691.0 / 180224.0,
)
# The asymptotic series is used for a >= _A_SWITCH (n >= 42); the first omitted term is
# |c_7| / a^13 < 2e-19 there, below double precision.
_A_SWITCH = 20.0


def _check_n(n: float, low: float, what: str = "n") -> None:
    """Raise ValueError unless every ``n`` is finite and greater than ``low``."""
    arr = np.asarray(n, dtype=float)
    if not np.all(np.isfinite(arr)) or np.any(arr <= low):
        raise ValueError(f"{what} must be finite and > {low:g}, got {n!r}")


def v_distribution(n: float) -> Any:
    """Distribution of ``V = (mu - M) / sigma`` for a batch of ``n`` values.

    Args:
        n: Number of values the batch mean is computed over (may be non-integer, > 0).

    Returns:
        The frozen ``scipy.stats.norm(0, 1/sqrt(n))``.

    Raises:
        ValueError: If ``n`` is not positive.
    """
    _check_n(n, 0.0)
    return stats.norm(loc=0.0, scale=1.0 / np.sqrt(n))


def s2_ratio_distribution(n: float, n_eff: float | None = None) -> Any:
    """Distribution of ``n S^2 / sigma^2``.

    Nominally ``chi^2_{n-1}``. With an effective sample size ``n_eff`` the model is
    ``n_eff S^2 / sigma^2 ~ chi^2_{n_eff-1}``, i.e. ``n S^2 / sigma^2 ~ (n/n_eff) chi^2_{n_eff-1}``.

    Args:
        n: Nominal number of values per batch statistic (> 1, may be non-integer).
        n_eff: Effective sample size (> 1), or None for the nominal model.

    Returns:
        A frozen ``scipy.stats.chi2`` distribution.

    Raises:
        ValueError: If ``n`` or ``n_eff`` is not greater than 1.
    """
    _check_n(n, 1.0)
    if n_eff is None:
        return stats.chi2(n - 1.0)
    _check_n(n_eff, 1.0, "n_eff")
    return stats.chi2(n_eff - 1.0, scale=n / n_eff)


def _series_d(a: np.ndarray) -> np.ndarray:
    """Asymptotic series of ``lgamma(a + 1/2) - lgamma(a) - log(a)/2`` for large ``a``."""
    inv2 = 1.0 / (a * a)
    acc = np.zeros_like(a)
    for coef in reversed(_D_SERIES):  # Horner in 1/a^2
        acc = acc * inv2 + coef
    return acc / a


def _log_gamma_ratio_d(a: np.ndarray) -> np.ndarray:
    """``D(a) = lgamma(a + 1/2) - lgamma(a) - log(a)/2`` for an array ``a > 0``.

    For ``a >= _A_SWITCH`` the asymptotic series is used directly. Below, the exact
    recurrence ``Gamma(a+1/2)/Gamma(a) = Gamma(b+1/2)/Gamma(b) * prod_j (a+j)/(a+j+1/2)``
    with ``b = a + m >= _A_SWITCH`` shifts the argument into the series' range. This avoids
    the ~1e-13 rounding noise of differencing ``gammaln`` and is continuous at the switch.
    """
    steps = np.where(a < _A_SWITCH, np.ceil(_A_SWITCH - a), 0.0)
    b = a + steps
    d = _series_d(b) + 0.5 * np.log(b / a)
    for j in range(int(steps.max(initial=0.0))):
        active = steps > j
        d[active] -= np.log1p(0.5 / (a[active] + j))
    return d


def _u_mean_var(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E[U] and Var[U] for a float array ``n > 3`` (no validation)."""
    # U = sqrt(n)/X, X ~ chi_{n-1}; with a = (n-2)/2:
    #   E[U] = sqrt(n/2) Gamma(a)/Gamma(a+1/2) = sqrt(1 + 1/a) exp(-D(a)),
    #   E[U^2] = n/(n-3) = (a+1)/(a-1/2),
    #   Var[U] = (1 + 1/a) [h/(1-h) - expm1(-2 D(a))], h = 1/(2a),
    # where both bracket terms are ~1/(2a) and ~1/(4a): no catastrophic cancellation.
    a = (n - 2.0) / 2.0
    d = _log_gamma_ratio_d(a)
    factor = 1.0 + 1.0 / a
    mean = np.sqrt(factor) * np.exp(-d)
    h = 0.5 / a
    var = factor * (h / (1.0 - h) - np.expm1(-2.0 * d))
    return mean, var


def u_moments(n: ArrayLike) -> tuple[ArrayLike, ArrayLike]:
    """Exact mean and variance of ``U = sqrt(n) / X``, ``X ~ chi_{n-1}``.

    Uses ``E[1/X] = Gamma((k-1)/2) / (sqrt(2) Gamma(k/2))`` and ``E[1/X^2] = 1/(k-2)``,
    ``k = n - 1``. The log-gamma ratio is evaluated by its asymptotic series for ``n >= 42``
    (truncation error < 2e-19) and, below, by the exact recurrence ``Gamma(a+1) = a Gamma(a)``
    into that range; the variance is formed without cancellation (see ``_u_mean_var``), so
    the relative accuracy is ~1e-15 for any ``n > 3``, including ``n = 1e7`` and beyond.

    Args:
        n: Number of values per batch (scalar or array, may be non-integer), all > 3.

    Returns:
        ``(mean, var)``: floats for scalar input, arrays of the input's shape otherwise.

    Raises:
        ValueError: If any ``n <= 3`` (the variance does not exist) or is not finite.
    """
    _check_n(n, 3.0)
    arr = np.asarray(n, dtype=float)
    mean, var = _u_mean_var(np.atleast_1d(arr))
    if arr.ndim == 0:
        return float(mean[0]), float(var[0])
    return mean.reshape(arr.shape), var.reshape(arr.shape)


class _UGen(stats.rv_continuous):
    """``U = sqrt(n) / X`` with ``X ~ chi_{n-1}``; shape parameter ``n > 1``."""

    def _argcheck(self, n: np.ndarray) -> np.ndarray:
        return np.asarray(n) > 1.0

    def _pdf(self, x: np.ndarray, n: np.ndarray) -> np.ndarray:
        return np.exp(self._logpdf(x, n))

    def _logpdf(self, x: np.ndarray, n: np.ndarray) -> np.ndarray:
        # Change of variables X = sqrt(n)/U, |dX/dU| = sqrt(n)/U^2.
        root = np.sqrt(n)
        return stats.chi.logpdf(root / x, n - 1.0) + np.log(root) - 2.0 * np.log(x)

    def _cdf(self, x: np.ndarray, n: np.ndarray) -> np.ndarray:
        return stats.chi.sf(np.sqrt(n) / x, n - 1.0)

    def _sf(self, x: np.ndarray, n: np.ndarray) -> np.ndarray:
        return stats.chi.cdf(np.sqrt(n) / x, n - 1.0)

    def _ppf(self, q: np.ndarray, n: np.ndarray) -> np.ndarray:
        return np.sqrt(n) / stats.chi.isf(q, n - 1.0)

    def _isf(self, q: np.ndarray, n: np.ndarray) -> np.ndarray:
        return np.sqrt(n) / stats.chi.ppf(q, n - 1.0)

    def _rvs(self, n: np.ndarray, size: Any = None, random_state: Any = None) -> np.ndarray:
        return np.sqrt(n) / np.sqrt(random_state.chisquare(n - 1.0, size))

    def _stats(self, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, None, None]:
        n = np.asarray(n, dtype=float)
        flat = np.atleast_1d(n).ravel()
        mean = np.full(flat.shape, np.inf)
        var = np.full(flat.shape, np.inf)
        ok = flat > 3.0
        mean[ok], var[ok] = _u_mean_var(flat[ok])
        # 2 < n <= 3: mean finite, variance infinite.
        mid = (flat > 2.0) & ~ok
        a = (flat[mid] - 2.0) / 2.0
        mean[mid] = np.sqrt(1.0 + 1.0 / a) * np.exp(-_log_gamma_ratio_d(a))
        return mean.reshape(n.shape), var.reshape(n.shape), None, None


_U_GEN = _UGen(a=0.0, name="bn_u", shapes="n")


def u_distribution(n: float) -> Any:
    """Distribution of ``U = sigma / S = sqrt(n) / X``, ``X ~ chi_{n-1}``.

    Args:
        n: Number of values per batch statistic (> 1, may be non-integer).

    Returns:
        A frozen scipy continuous distribution supporting ``pdf``, ``cdf``, ``ppf``,
        ``rvs``, ``mean``, ``var`` (finite for ``n > 3``) and use in ``scipy.stats.kstest``.

    Raises:
        ValueError: If ``n <= 1``.
    """
    _check_n(n, 1.0)
    return _U_GEN(float(n))
