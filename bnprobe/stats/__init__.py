"""Statistics of BN randomness: sampling distributions, n_eff fits, KS tests, scaling slopes."""

from __future__ import annotations

from .distributions import s2_ratio_distribution, u_distribution, u_moments, v_distribution
from .goodness import ks_s2_ratio, ks_v
from .neff import fit_neff, fit_neff_u, fit_neff_v
from .scaling import scaling_slope
from .summary import summarize, summarize_spatial

__all__ = [
    "fit_neff",
    "fit_neff_u",
    "fit_neff_v",
    "ks_s2_ratio",
    "ks_v",
    "s2_ratio_distribution",
    "scaling_slope",
    "summarize",
    "summarize_spatial",
    "u_distribution",
    "u_moments",
    "v_distribution",
]
