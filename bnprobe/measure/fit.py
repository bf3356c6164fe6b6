"""``fit_noise``: turn measurements into per-layer noise levels at one batch size."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..errors import BnprobeError
from .measurements import Measurements
from .noise_spec import NoiseSpec


def _channel_vars(samples: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, batch size, channel) variance of v and u over draws (full spatial fraction)."""
    full = samples[samples["fraction"] == 1.0]
    return full.groupby(["layer", "batch_size", "channel"])[["v", "u"]].var(ddof=1).sort_index()


def fit_noise(
    measurements: Measurements, batch_size: int = 32, summary: pd.DataFrame | None = None
) -> NoiseSpec:
    """Noise levels of every measured layer at ``batch_size``.

    A measured batch size uses the measured variances. Another batch size is predicted from
    the nearest measured one (in log k) with variances scaling as 1/k and n_eff as k.

    Args:
        measurements: Output of ``measure``.
        batch_size: The batch size to export.
        summary: A precomputed ``measurements.summary()`` (computed if None).

    Returns:
        The noise specification.
    """
    if batch_size < 2:
        raise BnprobeError(f"batch size {batch_size} is too small: BN statistics need at least 2 inputs")
    if summary is None:
        summary = measurements.summary(n_boot=0)
    summary = summary[summary["fraction"] == 1.0]
    chan = _channel_vars(measurements.samples)
    measured = measurements.batch_sizes
    k0 = min(measured, key=lambda k: abs(math.log(k) - math.log(batch_size)))
    factor = k0 / batch_size
    layers = []
    for _, row in summary[summary["batch_size"] == k0].sort_values("layer_index").iterrows():
        cv = chan.loc[(row["layer"], k0)]
        entry = {
            "name": row["layer"], "index": int(row["layer_index"]), "channels": int(row["channels"]),
            "spatial_size": int(row["spatial_size"]), "n": int(batch_size * row["spatial_size"]),
            "n_eff": float(row["n_eff"] / factor),
            "sigma_v": float(np.sqrt(row["var_v"] * factor)),
            "sigma_u": float(np.sqrt(row["var_u"] * factor)),
            "sigma_v_channels": [float(x) for x in np.sqrt(cv["v"].to_numpy() * factor)],
            "sigma_u_channels": [float(x) for x in np.sqrt(cv["u"].to_numpy() * factor)],
            "ks_stat": float(row["ks_stat"]), "ks_p": float(row["ks_p"]),
            "ks_stat_fit": float(row["ks_stat_fit"]), "ks_p_fit": float(row["ks_p_fit"]),
            "measured_batch_size": int(k0),
        }
        layers.append(entry)
    meta = measurements.meta
    source = {**meta.get("source", {}), **{k: meta.get("config", {}).get(k) for k in
                                            ("mode", "reference", "batch_sizes", "samples")}}
    return NoiseSpec(batch_size=int(batch_size), layers=layers, source=source)
