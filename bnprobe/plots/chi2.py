"""Histogram of ``n S^2 / sigma^2`` against the nominal and fitted chi-square models (Fig. 4 left)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import pandas as pd

from ..errors import BnprobeError
from . import _style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..measure.measurements import Measurements

LayerKey = Union[str, int, None]
_BINS = 50


def resolve_layer(layers: pd.DataFrame, key: str | int) -> tuple[str, int]:
    """The ``(name, index)`` of a layer given by name or index.

    A string that is a layer name wins over the same string read as an index.

    Args:
        layers: Table with columns ``layer`` and ``layer_index`` (e.g. a summary).
        key: A layer name, an index, or an index written as a string.

    Returns:
        ``(name, index)``.

    Raises:
        BnprobeError: If no layer matches; the message lists the layers.
    """
    table = layers[["layer", "layer_index"]].drop_duplicates().sort_values("layer_index")
    names = dict(zip(table["layer"], table["layer_index"]))
    if isinstance(key, str) and key in names:
        return key, int(names[key])
    try:
        index = int(key)
    except (TypeError, ValueError):
        index = None
    if index is not None and not isinstance(key, bool):
        for name, i in names.items():
            if int(i) == index:
                return name, index
    listing = ", ".join(f"{int(i)}={n}" for n, i in names.items())
    raise BnprobeError(f"unknown layer {key!r} (measured layers: {listing})")


def s2_ratio_samples(samples: pd.DataFrame, layer: str, batch_size: int, n: float) -> np.ndarray:
    """Finite values of ``n / u^2 = n S^2 / sigma^2`` of one layer, pooled over draws and channels."""
    rows = samples[(samples["layer"] == layer) & (samples["batch_size"] == batch_size)]
    u = _style.full_fraction(rows)["u"].to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = n / (u * u)
    return x[np.isfinite(x)]


def _x_range(x: np.ndarray, models: list[Any]) -> tuple[float, float]:
    """A range covering the bulk of the data and of the model densities."""
    lo, hi = (np.quantile(x, [0.002, 0.998]) if x.size else (np.inf, -np.inf))
    for dist in models:
        lo, hi = min(lo, dist.ppf(0.001)), max(hi, dist.ppf(0.999))
    pad = 0.03 * (hi - lo)
    return max(0.0, lo - pad), hi + pad


def _draw_layer(ax: Axes, x: np.ndarray, row: pd.Series, compact: bool) -> None:
    """One panel: the data histogram with the nominal and fitted densities."""
    from ..stats import s2_ratio_distribution

    n = float(row["n"])
    n_eff = float(row["n_eff"])
    nominal = s2_ratio_distribution(n)
    fitted = s2_ratio_distribution(n, n_eff) if math.isfinite(n_eff) and n_eff > 1 else None
    lo, hi = _x_range(x, [nominal] + ([fitted] if fitted is not None else []))
    edges = np.linspace(lo, hi, _BINS + 1)
    counts, _ = np.histogram(x, bins=edges)
    density = counts / max(x.size, 1) / np.diff(edges)  # normalized over all samples
    ax.stairs(density, edges, fill=True, color="0.72", edgecolor="0.45", linewidth=0.6,
              label=f"measured ({x.size} values)")
    grid = np.linspace(max(lo, 1e-12), hi, 400)
    nominal_line, = ax.plot(grid, nominal.pdf(grid), color="C0", lw=1.8,
                            label=rf"nominal $\chi^2_{{n-1}}$, n={n:.0f}, KS p={_style.fmt_p(row['ks_p'])}")
    nominal_line.set_gid("nominal")
    if fitted is not None:
        label = rf"fitted, $n_{{eff}}$={n_eff:.0f}, KS p={_style.fmt_p(row['ks_p_fit'])}"
        fitted_line, = ax.plot(grid, fitted.pdf(grid), color="C3", lw=1.8, ls="--", label=label)
        fitted_line.set_gid("fitted")
    top = max(float(density.max(initial=0.0)), float(nominal.pdf(nominal.mean())))
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, 1.32 * top)  # head room for the legend
    ax.set_xlabel(r"$n\,S^2/\sigma^2$")
    ax.set_ylabel("density")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.legend(loc="upper right", fontsize=6.5 if compact else 8.5, handlelength=1.6)


def plot_chi2(measurements: Measurements | _style.PathLike, layer: LayerKey = None,
              batch_size: int | None = None, out: _style.PathLike | None = None, pdf: bool = False,
              summary: pd.DataFrame | None = None) -> Figure:
    """Histogram of ``n S^2/sigma^2 = n/u^2`` against the chi-square densities (paper Fig. 4 left).

    Values are pooled over draws and channels at spatial fraction 1. The nominal model is
    ``chi^2_{n-1}`` with ``n = k z``; the fitted one ``(n/n_eff) chi^2_{n_eff-1}`` uses the
    summary's ``n_eff``. The legend gives n, n_eff and both KS p-values.

    Args:
        measurements: A ``Measurements`` or its folder (whose summary.csv is reused).
        layer: A layer name or index; None draws a grid with one panel per layer.
        batch_size: The batch size k (default 32 if measured, else the middle measured size).
        out: Where to save the figure (PNG unless the suffix says otherwise); None saves nothing.
        pdf: Also save a PDF next to ``out``.
        summary: A precomputed ``measurements.summary()``.

    Returns:
        The figure.

    Raises:
        BnprobeError: On an unknown layer or a batch size that was not measured.
    """
    m, summary = _style.load_measurements(measurements, summary, compute=False)
    k = _style.check_batch_size(batch_size, m.batch_sizes)
    name = resolve_layer(m.samples, layer)[0] if layer is not None else None
    if summary is None:  # only the shown groups are needed: fit them alone, without bootstrap
        from ..stats import summarize

        chosen = _style.full_fraction(m.samples[m.samples["batch_size"] == k])
        if name is not None:
            chosen = chosen[chosen["layer"] == name]
        summary = summarize(chosen, np.random.default_rng(0), n_boot=0)
    rows = _style.full_fraction(summary[summary["batch_size"] == k]).sort_values("layer_index")
    if name is not None:
        rows = rows[rows["layer"] == name]
    if rows.empty:
        raise BnprobeError(f"no summary rows for batch size {k}")
    count = len(rows)
    ncols = 1 if count == 1 else min(3, count)
    nrows = math.ceil(count / ncols)
    with _style.style():
        size = (6.4, 4.4) if count == 1 else (4.2, 3.3)
        fig, axes = _style.new_figure(nrows, ncols, *size)
        for ax, (_, row) in zip(axes.flat, rows.iterrows()):
            x = s2_ratio_samples(m.samples, row["layer"], k, float(row["n"]))
            _draw_layer(ax, x, row, compact=count > 1)
            z = int(row["spatial_size"])
            ax.set_title(f"{int(row['layer_index'])}: {row['layer']}  (k={k}, z={z})",
                         fontsize=9 if count > 1 else 11)
        for ax in list(axes.flat)[count:]:
            fig.delaxes(ax)
        if count > 1:
            fig.suptitle(rf"$n\,S^2/\sigma^2$ per BN layer at batch size k={k}: measured vs "
                         r"$\chi^2$ models")
        return _style.finish(fig, out, pdf)
