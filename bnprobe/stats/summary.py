"""Per-layer summaries of tidy BN samples: variances, n_eff fits, bias checks, KS tests, slopes.

The input table has one row per (layer, batch_size, fraction, draw, channel) with the
samples ``v`` and ``u``. It is sorted once and cut into contiguous (draws x channels)
blocks, so the work is vectorized per group rather than per row.

The ``n_eff`` fits are free of a per-channel bias of V and a per-channel scale error of U
(see :mod:`bnprobe.stats.neff`); such errors of the reference statistics are reported
separately by the bias columns ``mean_v``, ``v_bias_z``, ``v_bias_frac4``, ``mean_u``,
``eu_model`` and ``u_bias_z``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pandas as pd

from .distributions import u_moments
from .goodness import ks_s2_ratio
from .neff import fit_neff, fit_neff_u, fit_neff_v
from .scaling import _channel_mean_var, scaling_slope

REQUIRED_COLUMNS = (
    "layer",
    "layer_index",
    "channel",
    "batch_size",
    "spatial_size",
    "fraction",
    "draw",
    "v",
    "u",
)
_GROUP_KEYS = ("layer_index", "layer", "fraction", "batch_size")
_SLOPE_COLUMNS = ("slope_v", "slope_v_lo", "slope_v_hi", "slope_u", "slope_u_lo", "slope_u_hi")
SUMMARY_COLUMNS = (
    "layer",
    "layer_index",
    "batch_size",
    "fraction",
    "spatial_size",
    "n",
    "var_v",
    "var_u",
    "sigma_v",
    "sigma_u",
    "n_eff",
    "n_eff_v",
    "n_eff_u",
    "mean_v",
    "v_bias_z",
    "v_bias_frac4",
    "mean_u",
    "eu_model",
    "u_bias_z",
    "ks_stat",
    "ks_p",
    "ks_stat_fit",
    "ks_p_fit",
    "n_draws",
    "channels",
) + _SLOPE_COLUMNS
SPATIAL_COLUMNS = ("layer", "layer_index", "batch_size") + _SLOPE_COLUMNS


@dataclass(frozen=True)
class _Block:
    """The samples of one (layer, batch_size, fraction) group as draws x channels arrays."""

    layer: str
    layer_index: int
    batch_size: int
    fraction: float
    spatial_size: int
    v: np.ndarray
    u: np.ndarray

    @property
    def n(self) -> int:
        """Nominal values per statistic: ``batch_size * max(1, round(z * fraction))``."""
        return self.batch_size * max(1, int(round(self.spatial_size * self.fraction)))


def _check_columns(samples: pd.DataFrame) -> None:
    """Raise ValueError naming any missing required column."""
    missing = [c for c in REQUIRED_COLUMNS if c not in samples.columns]
    if missing:
        raise ValueError(f"samples table lacks columns: {', '.join(missing)}")


def _grid_shape(draw: np.ndarray, channel: np.ndarray) -> tuple[int, int]:
    """(draws, channels) of a block sorted by draw then channel; ValueError if not a grid."""
    size = draw.size
    changes = np.flatnonzero(draw != draw[0])
    c = int(changes[0]) if changes.size else size
    d = size // c
    ok = d * c == size
    if ok:
        dg, cg = draw.reshape(d, c), channel.reshape(d, c)
        ok = (
            bool(np.all(dg == dg[:, :1]))
            and bool(np.all(cg == cg[:1]))
            and bool(np.all(np.diff(dg[:, 0]) > 0))
            and bool(np.all(np.diff(cg[0]) > 0))
        )
    if not ok:
        raise ValueError("samples of a group do not form a complete draws x channels grid")
    return d, c


def _sort_order(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Row order sorting by (layer_index, layer, fraction, batch_size, draw, channel).

    Returns:
        ``(order, group)``: the permutation and each row's group number (in sorted order).
    """
    group = df.groupby(list(_GROUP_KEYS), sort=True, dropna=False).ngroup().to_numpy(dtype=np.int64)
    draw = df["draw"].to_numpy(dtype=np.int64)
    channel = df["channel"].to_numpy(dtype=np.int64)
    d_span = int(draw.max() - draw.min()) + 1
    c_span = int(channel.max() - channel.min()) + 1
    n_groups = int(group.max()) + 1
    if float(n_groups) * d_span * c_span < 2.0**62:
        # One composite int64 key: a single argsort is much faster than a lexsort.
        key = (group * d_span + (draw - draw.min())) * c_span + (channel - channel.min())
        order = np.argsort(key, kind="stable")
    else:
        order = np.lexsort((channel, draw, group))
    return order, group[order]


def _blocks(samples: pd.DataFrame) -> Iterator[_Block]:
    """Yield the groups sorted by layer_index, layer, fraction, batch_size."""
    df = samples.loc[:, list(REQUIRED_COLUMNS)]
    order, group = _sort_order(df)
    starts = np.flatnonzero(np.diff(group, prepend=-1))
    ends = np.append(starts[1:], group.size)

    draw = df["draw"].to_numpy()[order]
    channel = df["channel"].to_numpy()[order]
    v_all = df["v"].to_numpy(dtype=np.float64)[order]
    u_all = df["u"].to_numpy(dtype=np.float64)[order]
    # Per-group labels: read only each group's first row.
    first = df.iloc[order[starts]]
    layer, layer_index = first["layer"].to_numpy(), first["layer_index"].to_numpy()
    batch_size, fraction = first["batch_size"].to_numpy(), first["fraction"].to_numpy()
    spatial = first["spatial_size"].to_numpy()
    for i, (s, e) in enumerate(zip(starts, ends)):
        d, c = _grid_shape(draw[s:e], channel[s:e])
        yield _Block(
            layer=str(layer[i]),
            layer_index=int(layer_index[i]),
            batch_size=int(batch_size[i]),
            fraction=float(fraction[i]),
            spatial_size=int(spatial[i]),
            v=v_all[s:e].reshape(d, c),
            u=u_all[s:e].reshape(d, c),
        )


_NAN = float("nan")


def _fit_or_nan(fit: Any, *args: Any, **kwargs: Any) -> float:
    """``fit(*args, **kwargs)``, or NaN when it finds no channel with 2 usable draws."""
    try:
        return float(fit(*args, **kwargs))
    except ValueError as exc:
        if "2 or more" not in str(exc):
            raise
        return _NAN


def _v_bias(v: np.ndarray) -> dict[str, float]:
    """Per-channel bias of V: ``z_c = vbar_c / (sd_c / sqrt(d_c))`` summarized over channels.

    Returns:
        ``mean_v`` (mean of all finite v), ``v_bias_z`` (median over channels of ``|z_c|``,
        about 0.67 without bias) and ``v_bias_frac4`` (fraction of channels with
        ``|z_c| > 4``); the last two are NaN without a channel of 2 or more finite draws.
    """
    ok = np.isfinite(v)
    count = ok.sum(axis=0)
    mean_v = float(np.mean(v[ok])) if ok.any() else _NAN
    use = count >= 2
    if not use.any():
        return {"mean_v": mean_v, "v_bias_z": _NAN, "v_bias_frac4": _NAN}
    with np.errstate(divide="ignore", invalid="ignore"):
        vbar = np.nanmean(v[:, use], axis=0)
        sd = np.nanstd(v[:, use], axis=0, ddof=1)
        z = np.abs(vbar / (sd / np.sqrt(count[use])))
    z = z[~np.isnan(z)]  # 0/0: a constant zero channel
    if z.size == 0:
        return {"mean_v": mean_v, "v_bias_z": _NAN, "v_bias_frac4": _NAN}
    return {"mean_v": mean_v, "v_bias_z": float(np.median(z)),
            "v_bias_frac4": float(np.mean(z > 4.0))}


def _u_bias(u: np.ndarray, n_eff_u: float) -> dict[str, float]:
    """Mean of U against the model's ``E[U]`` at ``n_eff_u``, in standard errors.

    The standard error is the standard deviation over draws of the per-draw channel mean of
    u divided by ``sqrt(d)``: draws are independent, channels of one draw are not.

    Returns:
        ``mean_u``, ``eu_model`` (exact ``E[U]`` of ``sqrt(n)/chi_{n-1}`` at ``n = n_eff_u``;
        NaN unless ``3 < n_eff_u < inf``) and ``u_bias_z = (mean_u - eu_model) / SE``.
    """
    ok = np.isfinite(u)
    mean_u = float(np.mean(u[ok])) if ok.any() else _NAN
    eu = float(u_moments(n_eff_u)[0]) if np.isfinite(n_eff_u) and n_eff_u > 3.0 else _NAN
    rows = ok.any(axis=1)
    z = _NAN
    if rows.sum() >= 2 and np.isfinite(eu):
        per_draw = np.nanmean(u[rows], axis=1)
        se = float(np.std(per_draw, ddof=1)) / np.sqrt(per_draw.size)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = float(np.float64(mean_u - eu) / se)
    return {"mean_u": mean_u, "eu_model": eu, "u_bias_z": z}


def _group_row(b: _Block) -> dict[str, Any]:
    """The per-group statistics of one block (without slopes)."""
    n = b.n
    var_v, var_u = _channel_mean_var(b.v), _channel_mean_var(b.u)
    n_max = max(1e8, 100.0 * n)  # the search range must contain the nominal n
    n_eff = _fit_or_nan(fit_neff, b.v, b.u, n_max=n_max)
    n_eff_u = _fit_or_nan(fit_neff_u, b.u, n_max=n_max)
    u_flat = b.u.ravel()
    nan2 = (_NAN, _NAN)
    ks = ks_s2_ratio(u_flat, n) if n > 1 else nan2
    ks_fit = ks_s2_ratio(u_flat, n, n_eff) if n > 1 and n_eff > 1 else nan2
    return {
        "layer": b.layer,
        "layer_index": b.layer_index,
        "batch_size": b.batch_size,
        "fraction": b.fraction,
        "spatial_size": b.spatial_size,
        "n": n,
        "var_v": var_v,
        "var_u": var_u,
        "sigma_v": float(np.sqrt(var_v)),
        "sigma_u": float(np.sqrt(var_u)),
        "n_eff": n_eff,
        "n_eff_v": _fit_or_nan(fit_neff_v, b.v),
        "n_eff_u": n_eff_u,
        **_v_bias(b.v),
        **_u_bias(b.u, n_eff_u),
        "ks_stat": ks[0],
        "ks_p": ks[1],
        "ks_stat_fit": ks_fit[0],
        "ks_p_fit": ks_fit[1],
        "n_draws": int(b.v.shape[0]),
        "channels": int(b.v.shape[1]),
    }


def _slopes(
    x: list[float], blocks: list[_Block], rng: np.random.Generator, n_boot: int
) -> dict[str, float]:
    """Slopes of log var(v) and log var(u) against log x, with bootstrap intervals."""
    out: dict[str, float] = {}
    for name in ("v", "u"):
        res = scaling_slope(x, [getattr(b, name) for b in blocks], rng, n_boot=n_boot)
        out[f"slope_{name}"] = res["slope"]
        out[f"slope_{name}_lo"] = res["lo"]
        out[f"slope_{name}_hi"] = res["hi"]
    return out


def _by(blocks: list[_Block], key: Any) -> dict[Any, list[_Block]]:
    """Group blocks by ``key(block)``, keeping their order."""
    out: dict[Any, list[_Block]] = {}
    for b in blocks:
        out.setdefault(key(b), []).append(b)
    return out


def summarize(samples: pd.DataFrame, rng: np.random.Generator, n_boot: int = 500) -> pd.DataFrame:
    """Summarize BN samples per (layer, batch_size, fraction) and fit batch-size slopes.

    Args:
        samples: Tidy table with columns layer, layer_index, channel, batch_size,
            spatial_size, fraction, draw, v, u; each group must be a complete
            draws x channels grid.
        rng: Random generator for the bootstrap intervals of the slopes.
        n_boot: Number of bootstrap replicates per slope.

    Returns:
        One row per (layer, layer_index, batch_size, fraction), sorted by layer_index,
        fraction, batch_size, with the columns in ``SUMMARY_COLUMNS``: nominal ``n``;
        channel-mean variances ``var_v``/``var_u`` (per channel centred over draws) and
        their roots ``sigma_v``/``sigma_u``; ``n_eff`` (joint), ``n_eff_v`` (centred V) and
        ``n_eff_u`` (scale-free U), see :mod:`bnprobe.stats.neff`; the bias checks
        ``mean_v``, ``v_bias_z`` (median over channels of ``|vbar_c| / SE_c``, ~0.67
        unbiased), ``v_bias_frac4`` (fraction of channels with ``|vbar_c| > 4 SE_c``),
        ``mean_u``, ``eu_model`` (``E[U]`` of the model at ``n_eff_u``) and ``u_bias_z``
        (``mean_u - eu_model`` in standard errors over draws); KS tests of ``n/u^2``
        against the nominal and fitted (joint ``n_eff``) models; ``n_draws``, ``channels``;
        and per (layer, fraction) the slopes of log var against log batch size (repeated on
        that layer's rows). Fits that lack 2 draws per channel are NaN.

    Raises:
        ValueError: If columns are missing or a group is not a complete grid.
    """
    _check_columns(samples)
    if len(samples) == 0:
        return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    blocks = list(_blocks(samples))
    rows = [_group_row(b) for b in blocks]
    layer_key = _by(blocks, lambda b: (b.layer_index, b.layer, b.fraction))
    slope_of = {
        key: _slopes([float(b.batch_size) for b in group], group, rng, n_boot)
        for key, group in layer_key.items()
    }
    for row in rows:
        row.update(slope_of[(row["layer_index"], row["layer"], row["fraction"])])
    table = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    table = table.sort_values(["layer_index", "fraction", "batch_size"], kind="stable")
    return table.reset_index(drop=True)


def summarize_spatial(
    samples: pd.DataFrame, rng: np.random.Generator, n_boot: int = 500
) -> pd.DataFrame:
    """Slopes of log var against log(spatial_size * fraction) across fractions.

    Args:
        samples: Tidy samples table as for :func:`summarize`.
        rng: Random generator for the bootstrap intervals.
        n_boot: Number of bootstrap replicates per slope.

    Returns:
        One row per (layer, layer_index, batch_size) with at least 2 fractions, with the
        columns in ``SPATIAL_COLUMNS``, sorted by layer_index, batch_size.

    Raises:
        ValueError: If columns are missing or a group is not a complete grid.
    """
    _check_columns(samples)
    rows: list[dict[str, Any]] = []
    blocks = list(_blocks(samples)) if len(samples) else []
    for (index, layer, bs), group in _by(
        blocks, lambda b: (b.layer_index, b.layer, b.batch_size)
    ).items():
        group = sorted(group, key=lambda b: b.fraction)
        if len({b.fraction for b in group}) < 2:
            continue
        x = [b.spatial_size * b.fraction for b in group]
        row: dict[str, Any] = {"layer": layer, "layer_index": index, "batch_size": bs}
        row.update(_slopes(x, group, rng, n_boot))
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(SPATIAL_COLUMNS))
    return table.sort_values(["layer_index", "batch_size"], kind="stable").reset_index(drop=True)
