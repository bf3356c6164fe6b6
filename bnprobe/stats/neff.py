"""Effective sample size ``n_eff`` from (draws x channels) samples of V and U, scale-free.

Model for one BN unit with ``n_eff`` effectively independent values per batch statistic:
``V = (mu - M)/sigma ~ N(0, 1/n_eff)`` and ``R = 1/U^2 = S^2/sigma^2 ~ Gamma(alpha, 2/n_eff)``
with shape ``alpha = (n_eff - 1)/2`` (i.e. ``n_eff R ~ chi^2_{n_eff-1}``).

The reference statistics ``mu, sigma`` of a real network are themselves estimates, so the
samples may carry a per-channel bias in V and a per-channel scale error in U. Both are
treated as nuisance parameters and removed exactly:

* **V** is centred per channel over draws. The pooled unbiased variance
  ``s_v^2 = sum_c sum_d (v_dc - vbar_c)^2 / sum_c (d_c - 1)`` gives ``n_eff_v = 1/s_v^2``,
  the maximum of the centred (REML) likelihood ``(nu_v/2) log n - n SS/2`` with
  ``nu_v = sum_c (d_c - 1)`` degrees of freedom and ``SS`` the centred sum of squares.
* **U** enters only through the scale-free ratios ``r_dc / sum_d r_dc``, which for gamma
  samples are ``Dirichlet(alpha, ..., alpha)`` and independent of the per-channel scale. Their
  (marginal) log-likelihood per channel is, up to a constant,
  ``l_c(alpha) = lgamma(d alpha) - d lgamma(alpha) - d alpha (log d + s_c)`` with
  ``s_c = log(mean_d r_dc) - mean_d log r_dc >= 0``; its score equation is
  ``psi(d alpha) - psi(alpha) - log d = mean_c s_c``. This is the gamma-shape profile-likelihood
  equation ``log(alpha) - psi(alpha) = mean_c s_c`` with its small-sample correction built in:
  ``E[s_c] = psi(d alpha) - psi(alpha) - log d`` exactly, whereas the profile equation assumes
  ``E[s_c] = log(alpha) - psi(alpha)`` and so over-estimates ``alpha`` by a factor ``~d/(d-1)``.
  ``n_eff_u = 2 alpha + 1``. A common scale error of U (e.g. ``u * 1.1``) leaves it unchanged.
* **joint** ``n_eff`` maximizes the sum of both log-likelihoods at ``alpha = (n - 1)/2``.

Both likelihoods are concave in ``n``, so each fit is one root of a monotone score found by
``scipy.optimize.brentq`` in ``log n``. The log-gamma terms are evaluated through Stirling's
remainder, so the fits are accurate for ``n_eff`` from about 1 up to 1e8 and beyond. The
remaining bias of each estimator is of order ``2/nu`` (``nu`` the pooled degrees of freedom),
e.g. 0.03% for 32 channels of 200 draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize, special

_N_MIN = 1.0 + 1e-6
_N_MAX_DEFAULT = 1e8
_SERIES_FROM = 10.0
# Stirling remainder phi(x) = lgamma(x) - (x - 1/2) log x + x - log(2 pi)/2 ~ sum_k a_k / x^(2k-1).
_PHI_SERIES = (1 / 12, -1 / 360, 1 / 1260, -1 / 1680, 1 / 1188, -691 / 360360, 1 / 156)
# g(x) = log x - psi(x) ~ 1/(2x) + sum_k B_2k / (2k x^(2k)).
_G_SERIES = (1 / 12, -1 / 120, 1 / 252, -1 / 240, 1 / 132, -691 / 32760, 1 / 12)
_HALF_LOG_2PI = 0.5 * np.log(2.0 * np.pi)


def _poly_inv_sq(x: np.ndarray, coefs: tuple[float, ...]) -> np.ndarray:
    """``sum_k coefs[k] / x^(2k)`` by Horner's rule in ``1/x^2``."""
    inv2 = 1.0 / (x * x)
    acc = np.zeros_like(x)
    for coef in reversed(coefs):
        acc = acc * inv2 + coef
    return acc


def _stirling_phi(x: np.ndarray) -> np.ndarray:
    """``lgamma(x) - (x - 1/2) log x + x - log(2 pi)/2`` for ``x > 0`` without cancellation."""
    x = np.asarray(x, dtype=np.float64)
    big = x >= _SERIES_FROM
    out = np.empty_like(x)
    xb = x[big]
    out[big] = _poly_inv_sq(xb, _PHI_SERIES) / xb
    xs = x[~big]
    out[~big] = special.gammaln(xs) - (xs - 0.5) * np.log(xs) + xs - _HALF_LOG_2PI
    return out


def _log_minus_digamma(x: np.ndarray) -> np.ndarray:
    """``g(x) = log x - psi(x)`` for ``x > 0`` (positive, ~1/(2x)) without cancellation."""
    x = np.asarray(x, dtype=np.float64)
    big = x >= _SERIES_FROM
    out = np.empty_like(x)
    xb = x[big]
    out[big] = 0.5 / xb + _poly_inv_sq(xb, _G_SERIES) / (xb * xb)
    xs = x[~big]
    out[~big] = np.log(xs) - special.digamma(xs)
    return out


def _as_2d(x: np.ndarray | None) -> np.ndarray:
    """A float64 (draws x channels) array; 1-D input is one channel, None is empty."""
    if x is None:
        return np.empty((0, 0))
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        return arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"samples must be 1-D or 2-D (draws x channels), got shape {arr.shape}")
    return arr


@dataclass(frozen=True)
class _VStats:
    """Centred sufficient statistics of V: pooled degrees of freedom and sum of squares."""

    dof: float
    ss: float


@dataclass(frozen=True)
class _UStats:
    """Scale-free sufficient statistics of R = 1/U^2 per usable channel.

    Attributes:
        d: Draws per channel (finite positive u), each at least 2.
        s: ``log(mean r) - mean log r`` per channel (>= 0).
    """

    d: np.ndarray
    s: np.ndarray


def _v_stats(v: np.ndarray | None) -> _VStats | None:
    """Per-channel centred sum of squares of V pooled over channels (None if no dof)."""
    arr = _as_2d(v)
    if arr.size == 0:
        return None
    ok = np.isfinite(arr)
    count = ok.sum(axis=0)
    use = count >= 2
    if not np.any(use):
        return None
    arr, ok, count = arr[:, use], ok[:, use], count[use]
    filled = np.where(ok, arr, 0.0)
    mean = filled.sum(axis=0) / count
    resid = np.where(ok, arr - mean, 0.0)
    return _VStats(dof=float(np.sum(count - 1)), ss=float(np.sum(resid * resid)))


def _u_stats(u: np.ndarray | None) -> _UStats | None:
    """Per-channel draws and ``s_c = -mean log(r/mean r)`` of ``r = 1/u^2`` (None if unusable)."""
    arr = _as_2d(u)
    if arr.size == 0:
        return None
    ok = np.isfinite(arr) & (arr > 0)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        r = np.where(ok, 1.0 / (arr * arr), 1.0)
    ok &= np.isfinite(r) & (r > 0)
    count = ok.sum(axis=0)
    use = count >= 2
    if not np.any(use):
        return None
    r, ok, count = r[:, use], ok[:, use], count[use]
    # Divide by the channel's largest value first: the mean cannot overflow.
    r = r / np.max(np.where(ok, r, 0.0), axis=0)
    mean = np.where(ok, r, 0.0).sum(axis=0) / count
    # log(r/rbar) = log1p((r - rbar)/rbar) keeps s_c accurate when r varies by 1e-4 (n ~ 1e8).
    rel = np.where(ok, (r - mean) / mean, 0.0)
    s = -np.sum(np.log1p(rel), axis=0) / count
    return _UStats(d=count.astype(np.float64), s=np.maximum(s, 0.0))


def _score(n: float, vs: _VStats | None, us: _UStats | None) -> float:
    """Derivative in ``n`` of the joint (centred V + scale-free U) log-likelihood."""
    total = 0.0
    if vs is not None:
        total += 0.5 * vs.dof / n - 0.5 * vs.ss
    if us is not None:
        alpha = 0.5 * (n - 1.0)
        g_a = _log_minus_digamma(np.array([alpha]))[0]
        g_da = _log_minus_digamma(us.d * alpha)
        # dl_c/dalpha = d_c (psi(d_c alpha) - psi(alpha) - log d_c - s_c); dalpha/dn = 1/2.
        total += 0.5 * float(np.sum(us.d * (g_a - g_da - us.s)))
    return total


def _loglik(n: np.ndarray, vs: _VStats | None, us: _UStats | None) -> np.ndarray:
    """Joint log-likelihood (up to a constant) at the values ``n`` (for tests and diagnostics)."""
    n = np.atleast_1d(np.asarray(n, dtype=np.float64))
    ll = np.zeros_like(n)
    if vs is not None:
        ll += 0.5 * vs.dof * np.log(n) - 0.5 * n * vs.ss
    if us is not None:
        for i, alpha in enumerate(0.5 * (n - 1.0)):
            # lgamma(d a) - d lgamma(a) - d a log d = (d-1)/2 log a + phi(d a) - d phi(a) + const.
            a = np.array([alpha])
            per = (0.5 * (us.d - 1.0) * np.log(alpha) + _stirling_phi(us.d * alpha)
                   - us.d * _stirling_phi(a)[0] - us.d * alpha * us.s)
            ll[i] += float(np.sum(per))
    return ll


def _solve(vs: _VStats | None, us: _UStats | None, n_max: float | None) -> float:
    """Root of the (decreasing) joint score in ``[1 + 1e-6, n_max]``, clipped to the bounds."""
    hi = _N_MAX_DEFAULT if n_max is None else float(n_max)
    if not hi > _N_MIN:
        raise ValueError(f"n_max must be > {_N_MIN}, got {n_max!r}")
    if vs is None and us is None:
        raise ValueError("no channel has 2 or more finite draws to fit n_eff")
    f_lo, f_hi = _score(_N_MIN, vs, us), _score(hi, vs, us)
    if f_lo <= 0.0:
        return _N_MIN
    if f_hi >= 0.0:
        return hi
    root = optimize.brentq(
        lambda t: _score(float(np.exp(t)), vs, us),
        np.log(_N_MIN), np.log(hi), xtol=1e-12, rtol=1e-12, maxiter=200,
    )
    return float(np.exp(root))


def fit_neff(v: np.ndarray, u: np.ndarray, n_max: float | None = None) -> float:
    """Joint ``n_eff`` from centred V and scale-free U (maximum of the summed likelihoods).

    Maximizes ``(nu_v/2) log n - n SS_v/2 + sum_c l_c((n - 1)/2)`` (see the module docstring):
    the centred-V likelihood with ``nu_v = sum_c (d_c - 1)`` degrees of freedom plus the
    scale-free (Dirichlet) likelihood of the gamma shape of ``R = 1/U^2``. A per-channel
    shift of V and a per-channel scale of U do not change the result.

    Args:
        v: ``V`` samples, 2-D (draws x channels) or 1-D (one channel); non-finite values are
            dropped per channel. May be None or empty to fit from U alone.
        u: ``U`` samples shaped likewise; non-finite and non-positive values are dropped.
            May be None or empty to fit from V alone.
        n_max: Upper bound of the search (default 1e8). The lower bound is ``1 + 1e-6``.

    Returns:
        The estimate of ``n_eff``, clipped to the search range.

    Raises:
        ValueError: If no channel of v or u has 2 usable draws, on arrays of more than two
            dimensions, or if ``n_max`` is not above the lower bound.
    """
    return _solve(_v_stats(v), _u_stats(u), n_max)


def fit_neff_v(v: np.ndarray) -> float:
    """``n_eff`` from V centred per channel: ``1/s_v^2`` (pooled unbiased variance).

    ``s_v^2 = sum_c sum_d (v_dc - vbar_c)^2 / sum_c (d_c - 1)``, over channels with 2 or
    more finite draws. Unaffected by any per-channel bias of V.

    Args:
        v: ``V`` samples, 2-D (draws x channels) or 1-D (one channel).

    Returns:
        ``1 / s_v^2`` (``inf`` if every channel is constant).

    Raises:
        ValueError: If no channel has 2 finite draws, or ``v`` has more than two dimensions.
    """
    vs = _v_stats(v)
    if vs is None:
        raise ValueError("no channel has 2 or more finite v draws to fit n_eff")
    return float("inf") if vs.ss == 0.0 else vs.dof / vs.ss


def fit_neff_u(u: np.ndarray, n_max: float | None = None) -> float:
    """``n_eff`` from U alone, free of any per-channel scale error of U.

    ``n_eff_u = 2 alpha + 1`` with ``alpha`` the root of
    ``psi(d alpha) - psi(alpha) - log d = mean_c s_c``, ``s_c = log(mean_d r) - mean_d log r``,
    ``r = 1/u^2`` (channels weighted by their draws ``d_c`` if these differ). This is the
    gamma-shape maximum-likelihood equation with the per-channel scale integrated out exactly
    (the Dirichlet likelihood of ``r / sum_d r``), which removes the ``O(1/d)`` bias of the
    plain profile equation ``log(alpha) - psi(alpha) = mean_c s_c``.

    Args:
        u: ``U`` samples, 2-D (draws x channels) or 1-D (one channel); non-finite and
            non-positive values are dropped per channel.
        n_max: Upper bound of the search (default 1e8).

    Returns:
        The estimate of ``n_eff``, clipped to ``[1 + 1e-6, n_max]``.

    Raises:
        ValueError: If no channel has 2 usable draws, or ``u`` has more than two dimensions.
    """
    us = _u_stats(u)
    if us is None:
        raise ValueError("no channel has 2 or more finite positive u draws to fit n_eff")
    return _solve(None, us, n_max)
