"""Log-log scaling slopes of the variance of BN statistics, with bootstrap intervals.

Under the model ``Var[V] ~ 1/n`` and ``Var[U] ~ 1/(2n)``, so the slope of ``log Var`` against
``log k`` (batch size) or ``log z`` (spatial size) is ``-1`` when samples are independent.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_STATS = ("var",)


def _channel_mean_var(block: np.ndarray) -> float:
    """Mean over channels of the per-channel variance (ddof=1) over draws (rows)."""
    if block.shape[0] < 2:
        return float("nan")
    return float(np.mean(np.var(block, axis=0, ddof=1)))


def _bootstrap_channel_mean_var(
    block: np.ndarray, rng: np.random.Generator, n_boot: int
) -> np.ndarray:
    """``n_boot`` bootstrap replicates of :func:`_channel_mean_var` (rows resampled).

    Resampling rows with replacement gives row counts ``W`` (n_boot x draws); the resampled
    sums are then ``W @ x`` and ``W @ x^2`` (matrix products, no resampled copies).
    """
    d = block.shape[0]
    if d < 2:
        return np.full(n_boot, np.nan)
    centered = block - block.mean(axis=0)  # centring reduces cancellation in sum-of-squares
    idx = rng.integers(0, d, size=(n_boot, d))
    idx += d * np.arange(n_boot)[:, None]  # offset each replicate into its own row
    counts = np.bincount(idx.ravel(), minlength=n_boot * d).reshape(n_boot, d).astype(np.float64)
    s1 = counts @ centered  # (n_boot, channels) resampled sums
    # The channel mean of the resampled sums of squares needs only a matrix-vector product.
    s2_mean = counts @ np.mean(centered * centered, axis=1)
    return (s2_mean - np.mean(s1 * s1, axis=1) / d) / (d - 1)


def _ols_slope(log_x: np.ndarray, log_y: np.ndarray) -> np.ndarray:
    """OLS slope of ``log_y`` (..., G) against ``log_x`` (G,) along the last axis."""
    dx = log_x - log_x.mean()
    dy = log_y - log_y.mean(axis=-1, keepdims=True)
    return (dy @ dx) / (dx @ dx)


def scaling_slope(
    x: Sequence[float] | np.ndarray,
    groups: Sequence[np.ndarray],
    rng: np.random.Generator,
    n_boot: int = 1000,
    stat: str = "var",
) -> dict[str, float]:
    """Slope of ``log stat`` against ``log x`` with a percentile bootstrap 95% interval.

    The statistic of a group is the mean over channels of the per-channel variance over
    draws (``ddof=1``). The bootstrap resamples draws (rows) with replacement within each
    group independently.

    Args:
        x: Positive regressor values (batch sizes or spatial sizes), one per group.
        groups: One 2-D array (draws x channels) of samples (v or u) per ``x`` value.
        rng: Random generator for the bootstrap.
        n_boot: Number of bootstrap replicates.
        stat: The group statistic; only ``"var"`` is supported.

    Returns:
        ``{"slope": ..., "lo": ..., "hi": ...}``; all NaN with fewer than 2 distinct ``x``.

    Raises:
        ValueError: On an unknown ``stat``, mismatched lengths, non-positive ``x`` or
            groups that are not 2-D.
    """
    if stat not in _STATS:
        raise ValueError(f"unknown stat {stat!r}; choose from {', '.join(_STATS)}")
    x_arr = np.asarray(x, dtype=np.float64).ravel()
    if x_arr.size != len(groups):
        raise ValueError(f"got {x_arr.size} x values but {len(groups)} groups")
    nan = {"slope": float("nan"), "lo": float("nan"), "hi": float("nan")}
    if np.unique(x_arr).size < 2:
        return nan
    if np.any(~np.isfinite(x_arr)) or np.any(x_arr <= 0):
        raise ValueError("x values must be finite and positive")
    blocks = [np.asarray(g, dtype=np.float64) for g in groups]
    if any(b.ndim != 2 for b in blocks):
        raise ValueError("each group must be a 2-D array (draws x channels)")

    log_x = np.log(x_arr)
    with np.errstate(divide="ignore", invalid="ignore"):
        point = np.log(np.array([_channel_mean_var(b) for b in blocks]))
        slope = float(_ols_slope(log_x, point))
        if n_boot <= 0:
            return {"slope": slope, "lo": float("nan"), "hi": float("nan")}
        boot = np.log(np.stack([_bootstrap_channel_mean_var(b, rng, n_boot) for b in blocks], 1))
        slopes = _ols_slope(log_x, boot)
    slopes = slopes[np.isfinite(slopes)]
    if slopes.size == 0:
        return {"slope": slope, "lo": float("nan"), "hi": float("nan")}
    lo, hi = np.percentile(slopes, [2.5, 97.5])
    return {"slope": slope, "lo": float(lo), "hi": float(hi)}
