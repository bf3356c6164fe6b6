"""Kolmogorov-Smirnov goodness-of-fit tests of BN samples against the Gaussian model."""

from __future__ import annotations

import numpy as np
from scipy import stats

from .distributions import s2_ratio_distribution, v_distribution


def _clean(x: np.ndarray) -> np.ndarray:
    """Flatten to float64 and drop non-finite values; raise if nothing is left."""
    arr = np.asarray(x, dtype=np.float64).ravel()
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        raise ValueError("no finite samples for the KS test")
    return arr


def ks_s2_ratio(u: np.ndarray, n: float, n_eff: float | None = None) -> tuple[float, float]:
    """KS test of ``n / u^2`` (``= n S^2 / sigma^2``) against the chi-square model.

    Args:
        u: Samples of ``U = sigma / S`` (non-finite values are dropped).
        n: Nominal number of values per batch statistic (> 1).
        n_eff: Effective sample size for the scaled model, or None for ``chi^2_{n-1}``.

    Returns:
        ``(statistic, pvalue)`` of the two-sided one-sample KS test.
    """
    arr = _clean(u)
    res = stats.kstest(n / (arr * arr), s2_ratio_distribution(n, n_eff).cdf)
    return float(res.statistic), float(res.pvalue)


def ks_v(v: np.ndarray, n: float) -> tuple[float, float]:
    """KS test of ``V`` samples against ``N(0, 1/n)``.

    Args:
        v: Samples of ``V = (mu - M) / sigma`` (non-finite values are dropped).
        n: Number of values per batch statistic (> 0, e.g. a fitted ``n_eff``).

    Returns:
        ``(statistic, pvalue)`` of the two-sided one-sample KS test.
    """
    res = stats.kstest(_clean(v), v_distribution(n).cdf)
    return float(res.statistic), float(res.pvalue)
