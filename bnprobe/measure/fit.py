"""``fit_noise``: turn measurements into per-layer noise levels at one batch size.

:func:`fit_device_noise` does the same for a multi-GPU set-up: without SyncBN each BN layer
sees the noise of one device's batch, with SyncBN that of the global batch.

Each layer entry also carries the bias checks of the summary (``v_bias_z``, ``v_bias_frac4``,
``u_bias_z``, ``mean_u``, ``eu_model``, at the measured batch size) and a list of ``flags``:
short warnings that the measured noise does not fit the Gaussian model (biased V, U off the
model's mean, tiny or non-finite ``n_eff``). :func:`noise_flags` lists them per layer.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ..errors import BnprobeError
from ..noise.spec import NoiseSpec
from .measurements import Measurements


def _channel_vars(samples: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, batch size, channel) variance of v and u over draws (full spatial fraction)."""
    full = samples[samples["fraction"] == 1.0]
    return full.groupby(["layer", "batch_size", "channel"])[["v", "u"]].var(ddof=1).sort_index()


# Summary columns copied into each layer entry when present (NaN is written as null).
BIAS_FIELDS = ("v_bias_z", "v_bias_frac4", "u_bias_z", "mean_u", "eu_model")
V_BIAS_FRAC_MAX = 0.05
U_BIAS_Z_MAX = 4.0
N_EFF_MIN = 4.0
#: A layer is broken (no noise file without --force) beyond these: the Gaussian V/U model
#: cannot describe it (n_eff near 1, U's std near its mean, E[U] far from the model's).
BROKEN_N_EFF = 2.0
BROKEN_SIGMA_U = 0.8
BROKEN_EU_RATIO = 1.5
BROKEN_V_BIAS_FRAC = 0.5
BROKEN = "broken: "
_CHECKED_FIELDS = ("n_eff", "sigma_v", "sigma_u", "v_bias_z", "v_bias_frac4", "u_bias_z")


def _number(x: Any) -> float | None:
    """``x`` as a float, or None when it is missing or not finite."""
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def layer_flags(entry: dict[str, Any]) -> list[str]:
    """Short warnings for one NoiseSpec layer entry.

    Args:
        entry: A layer dict with n_eff, sigma_v, sigma_u and optionally the bias fields.

    Returns:
        Zero or more of: ``"non-finite: <fields>"`` (NaN or missing-as-null values),
        ``"V biased: 45% of channels |mean| > 4 SE"`` (``v_bias_frac4 > 0.05``),
        ``"U mean off the model by 7.3 SE (above)"`` (``|u_bias_z| > 4``), ``"n_eff 2.1 < 4"``,
        ``"1x1 maps: ..."``, and ``"broken: <reason>"`` for each of :func:`broken_reasons`.
    """
    flags = []
    bad = [k for k in _CHECKED_FIELDS if k in entry and _number(entry[k]) is None]
    if bad:
        flags.append(f"non-finite: {', '.join(bad)}")
    frac = _number(entry.get("v_bias_frac4"))
    if frac is not None and frac > V_BIAS_FRAC_MAX:
        flags.append(f"V biased: {frac:.0%} of channels |mean| > 4 SE")
    z = _number(entry.get("u_bias_z"))
    if z is not None and abs(z) > U_BIAS_Z_MAX:
        flags.append(f"U mean off the model by {abs(z):.1f} SE ({'above' if z > 0 else 'below'})")
    n_eff = _number(entry.get("n_eff"))
    if n_eff is not None and n_eff < N_EFF_MIN:
        flags.append(f"n_eff {n_eff:.1f} < {N_EFF_MIN:g}")
    if int(entry.get("spatial_size", 0) or 0) == 1:
        flags.append("1x1 maps: BN statistics over the batch alone (n = k)")
    return flags + [BROKEN + reason for reason in broken_reasons(entry)]


def broken_reasons(entry: dict[str, Any]) -> list[str]:
    """Why a layer's measurement is clearly unusable as a noise model (empty when it is not).

    Args:
        entry: A layer dict with n_eff, sigma_u and optionally mean_u, eu_model.

    Returns:
        Reasons: non-finite sigmas or n_eff, ``n_eff < 2``, ``sigma_U >= 0.8`` (the batch
        variance does not estimate the population's), ``E[U]`` more than 1.5 times off the
        model's (or off 1 when the model's is undefined), V's mean off zero (> 4 SE) in more
        than half of the channels (the reference is not this data's mean).
    """
    reasons = []
    if any(_number(entry.get(k)) is None for k in ("n_eff", "sigma_v", "sigma_u")):
        reasons.append("non-finite sigma or n_eff")
    n_eff, sigma_u = _number(entry.get("n_eff")), _number(entry.get("sigma_u"))
    if n_eff is not None and n_eff < BROKEN_N_EFF:
        reasons.append(f"n_eff {n_eff:.2g} < {BROKEN_N_EFF:g}")
    if sigma_u is not None and sigma_u >= BROKEN_SIGMA_U:
        reasons.append(f"sigma_U {sigma_u:.2g} >= {BROKEN_SIGMA_U:g}")
    frac = _number(entry.get("v_bias_frac4"))
    if frac is not None and frac > BROKEN_V_BIAS_FRAC:
        reasons.append(f"V's mean off zero in {frac:.0%} of channels")
    mean_u = _number(entry.get("mean_u"))
    if mean_u is not None:
        model = _number(entry.get("eu_model")) or 1.0
        ratio = mean_u / model
        if not 1 / BROKEN_EU_RATIO <= ratio <= BROKEN_EU_RATIO:
            reasons.append(f"E[U] {mean_u:.3g} vs {model:.3g} of the model")
    return reasons


def broken_layers(spec: NoiseSpec) -> list[str]:
    """``"NAME: reason; reason"`` for every layer whose flags mark it broken."""
    out = []
    for layer in spec.layers:
        reasons = [f[len(BROKEN):] for f in layer.get("flags") or layer_flags(layer) if f.startswith(BROKEN)]
        if reasons:
            out.append(f"{layer['name']}: {'; '.join(reasons)}")
    return out


def noise_flags(spec: NoiseSpec) -> list[str]:
    """One line ``"layer NAME: flag; flag"`` per layer with flags, in network order.

    Args:
        spec: A noise specification; layers without a ``flags`` list are checked afresh.

    Returns:
        The lines (empty when no layer is flagged).
    """
    lines = []
    for layer in spec.layers:
        flags = layer.get("flags")
        if flags is None:
            flags = layer_flags(layer)
        if flags:
            lines.append(f"layer {layer['name']}: {'; '.join(str(f) for f in flags)}")
    return lines


def fit_noise(
    measurements: Measurements, batch_size: int = 32, summary: pd.DataFrame | None = None
) -> NoiseSpec:
    """Noise levels of every measured layer at ``batch_size``.

    A measured batch size uses the measured variances. Another batch size is predicted from
    the nearest measured one (in log k) with variances scaling as 1/k and n_eff as k.
    The bias checks (``BIAS_FIELDS``, when the summary has them) are those of the measured
    batch size; ``flags`` lists what :func:`layer_flags` finds.

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
        entry.update({k: _number(row[k]) for k in BIAS_FIELDS if k in row.index})
        entry["flags"] = layer_flags(entry)
        layers.append(entry)
    meta = measurements.meta
    source = {**meta.get("source", {}), **{k: meta.get("config", {}).get(k) for k in
                                            ("mode", "reference", "batch_sizes", "samples")}}
    return NoiseSpec(batch_size=int(batch_size), layers=layers, source=source)


def fit_device_noise(
    measurements: Measurements, per_device_batch: int, world_size: int, sync_bn: bool = False,
    summary: pd.DataFrame | None = None,
) -> tuple[NoiseSpec, pd.DataFrame]:
    """The noise each BN layer sees when training on several devices (torchrun, DDP).

    Each of ``world_size`` processes takes ``per_device_batch`` inputs per step. Without
    SyncBN every device normalizes by its own batch: the noise at ``per_device_batch``; with
    SyncBN the statistics are those of the global batch ``per_device_batch * world_size``.
    Both are :func:`fit_noise` at that batch size.

    Args:
        measurements: Output of ``measure``.
        per_device_batch: Inputs per step and device.
        world_size: Number of devices (processes).
        sync_bn: Whether BN is synchronized across devices.
        summary: A precomputed ``measurements.summary()`` (computed if None).

    Returns:
        ``(spec, table)``: the noise specification of the set-up (its ``source`` records
        per_device_batch, world_size, sync_bn and global_batch) and one row per layer with
        ``index``, ``layer`` and ``sigma_v``/``sigma_u`` without SyncBN (``*_device``, at
        ``per_device_batch``) and with it (``*_sync``, at the global batch).
    """
    if world_size < 1:
        raise BnprobeError(f"world size must be at least 1, got {world_size}")
    if summary is None:
        summary = measurements.summary(n_boot=0)
    k_global = per_device_batch * world_size
    device = fit_noise(measurements, per_device_batch, summary)
    synced = fit_noise(measurements, k_global, summary)
    spec = synced if sync_bn else device
    spec.source.update({"per_device_batch": int(per_device_batch), "world_size": int(world_size),
                        "sync_bn": bool(sync_bn), "global_batch": int(k_global)})
    table = pd.DataFrame([
        {"index": a["index"], "layer": a["name"], "sigma_v_device": a["sigma_v"],
         "sigma_u_device": a["sigma_u"], "sigma_v_sync": b["sigma_v"], "sigma_u_sync": b["sigma_u"]}
        for a, b in zip(device.layers, synced.layers)
    ])
    return spec, table
