"""Maximum-likelihood effective sample size ``n_eff`` from samples of V and U.

Model: ``V ~ N(0, 1/n_eff)`` and, independently, ``R = S^2/sigma^2 = 1/U^2 ~
Gamma(shape=(n_eff-1)/2, scale=2/n_eff)`` (i.e. ``n_eff R ~ chi^2_{n_eff-1}``).
The log-likelihood depends on the data only through ``sum v^2``, ``sum r`` and ``sum log r``,
so each evaluation is O(1) and a coarse grid followed by a bounded Brent search is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize, special

_N_MIN = 1.0 + 1e-6
_N_MAX_DEFAULT = 1e8
_GRID_POINTS = 257


@dataclass(frozen=True)
class _Suff:
    """Sufficient statistics of the samples (counts and means)."""

    n_v: int
    mean_v2: float
    n_r: int
    mean_r: float
    mean_log_r: float


def _finite(x: np.ndarray | None) -> np.ndarray:
    """Flatten to float64 and drop non-finite values (None -> empty)."""
    if x is None:
        return np.empty(0)
    arr = np.asarray(x, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]


def _suff(v: np.ndarray | None, u: np.ndarray | None) -> _Suff:
    """Sufficient statistics of ``v`` and of ``r = 1/u^2`` (non-finite values dropped)."""
    v = _finite(v)
    u = _finite(u)
    u = u[u > 0]
    if v.size == 0 and u.size == 0:
        raise ValueError("no finite samples to fit n_eff")
    r = 1.0 / (u * u)
    return _Suff(
        n_v=int(v.size),
        mean_v2=float(np.mean(v * v)) if v.size else 0.0,
        n_r=int(r.size),
        mean_r=float(np.mean(r)) if r.size else 0.0,
        mean_log_r=float(np.mean(np.log(r))) if r.size else 0.0,
    )


def _neg_loglik(log_m: np.ndarray, s: _Suff) -> np.ndarray:
    """Negative log-likelihood (up to constants) at ``n_eff = exp(log_m)``."""
    m = np.exp(log_m)
    ll = np.zeros_like(m)
    if s.n_v:
        # V ~ N(0, 1/m): 0.5 log m - 0.5 m v^2 per sample.
        ll += s.n_v * (0.5 * log_m - 0.5 * m * s.mean_v2)
    if s.n_r:
        # R ~ Gamma(alpha, theta), alpha = (m-1)/2, theta = 2/m.
        alpha = 0.5 * (m - 1.0)
        per = (
            (alpha - 1.0) * s.mean_log_r
            - 0.5 * m * s.mean_r
            + alpha * (log_m - np.log(2.0))
            - special.gammaln(alpha)
        )
        ll += s.n_r * per
    return -ll


def _fit(s: _Suff, n_max: float | None) -> float:
    """Maximize the likelihood over ``log n_eff`` in ``[log(1+1e-6), log(n_max)]``."""
    hi_n = _N_MAX_DEFAULT if n_max is None else float(n_max)
    if not hi_n > _N_MIN:
        raise ValueError(f"n_max must be > {_N_MIN}, got {n_max!r}")
    lo, hi = np.log(_N_MIN), np.log(hi_n)
    # Coarse grid to bracket the global optimum, then bounded Brent inside the bracket.
    grid = np.linspace(lo, hi, _GRID_POINTS)
    with np.errstate(over="ignore", invalid="ignore"):
        values = _neg_loglik(grid, s)
    best = int(np.nanargmin(values))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
    res = optimize.minimize_scalar(
        lambda t: float(_neg_loglik(np.array([t]), s)[0]),
        bounds=(a, b),
        method="bounded",
        options={"xatol": 1e-10},
    )
    return float(np.exp(res.x))


def fit_neff(v: np.ndarray, u: np.ndarray, n_max: float | None = None) -> float:
    """Joint maximum-likelihood ``n_eff`` from samples of V and U.

    Args:
        v: 1-D array of ``V`` samples (pooled over draws, and channels if pooled).
        u: 1-D array of ``U`` samples; ``S^2/sigma^2`` is taken as ``1/u^2``.
        n_max: Upper bound of the search (default 1e8). The lower bound is ``1 + 1e-6``.

    Returns:
        The ML estimate of ``n_eff`` (a bound when the optimum lies outside the range).

    Raises:
        ValueError: If there are no finite samples or ``n_max`` is not above the lower bound.
    """
    return _fit(_suff(v, u), n_max)


def fit_neff_v(v: np.ndarray) -> float:
    """Maximum-likelihood ``n_eff`` from ``V ~ N(0, 1/n_eff)`` alone: ``1 / mean(v^2)``.

    Args:
        v: 1-D array of ``V`` samples (non-finite values are dropped).

    Returns:
        ``1 / mean(v^2)`` (``inf`` if all samples are zero).

    Raises:
        ValueError: If there are no finite samples.
    """
    arr = _finite(v)
    if arr.size == 0:
        raise ValueError("no finite samples to fit n_eff")
    mean_v2 = float(np.mean(arr * arr))
    return float("inf") if mean_v2 == 0.0 else 1.0 / mean_v2


def fit_neff_u(u: np.ndarray, n_max: float | None = None) -> float:
    """Maximum-likelihood ``n_eff`` from U alone (``n_eff / u^2 ~ chi^2_{n_eff-1}``).

    Args:
        u: 1-D array of ``U`` samples (non-finite and non-positive values are dropped).
        n_max: Upper bound of the search (default 1e8).

    Returns:
        The ML estimate of ``n_eff``.

    Raises:
        ValueError: If there are no usable samples.
    """
    s = _suff(None, u)
    if s.n_r == 0:
        raise ValueError("no finite positive u samples to fit n_eff")
    return _fit(s, n_max)
