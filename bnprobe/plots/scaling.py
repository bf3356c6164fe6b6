"""Log-log scaling of Var(V) and Var(U) with batch size and spatial size (paper Fig. 4 middle, right)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from . import _style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..measure.measurements import Measurements

_STATS = (("v", "V"), ("u", "U"))
_MAX_LEGEND_LAYERS = 14
_NCOL = 2
_PANEL_W, _PANEL_H = 5.6, 3.4


def slope_guide(ax: Axes, x: Sequence[float], y: Sequence[float], slope: float = -1.0,
                label: str | None = None) -> None:
    """A dashed line of the given log-log slope over the x range, through the data's centre."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if not ok.any():
        return
    lx, ly = np.log(x[ok]), np.log(y[ok])
    cx, cy = lx.mean(), ly.mean()
    xs = np.exp(np.array([lx.min(), lx.max()]))
    ys = np.exp(cy + slope * (np.log(xs) - cx))
    line, = ax.plot(xs, ys, color="0.25", ls="--", lw=1.3, zorder=1,
                    label=label if label is not None else f"slope {slope:g}".replace("-", "\u2212"))
    line.set_gid("slope_guide")


def _log_axes(ax: Axes) -> None:
    """Log-log axes; minor y ticks unlabelled unless the data span less than two decades."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="minor", axis="y", alpha=0.25)
    lo, hi = ax.get_ylim()
    if hi / lo >= 100.0:
        ax.yaxis.set_minor_formatter(NullFormatter())


def _ticks(ax: Axes, values: Sequence[float]) -> None:
    """Label the measured x values (batch or spatial sizes) on a log axis."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    uniq = sorted({float(v) for v in values})
    ax.xaxis.set_major_locator(FixedLocator(uniq))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())


def _layer_legend(ax: Axes, where: Axes, indices: pd.Series, slopes: pd.Series, title: str) -> None:
    """Legend of ``ax`` with one slope per layer, drawn in the axis-less strip ``where``.

    With many layers only the guide is listed, with the range of the slopes, and a colour bar
    maps colour to layer index.
    """
    handles, labels = ax.get_legend_handles_labels()
    many = indices.nunique() > _MAX_LEGEND_LAYERS
    if many:
        keep = [i for i, h in enumerate(handles) if h.get_gid() == "slope_guide"]
        handles, labels = [handles[i] for i in keep], [labels[i] for i in keep]
        title += f"\nslopes {_style.fmt_slope(slopes.min())} to {_style.fmt_slope(slopes.max())}"
    where.legend(handles, labels, title=title, fontsize=7, title_fontsize=7.5, loc="upper center",
                 borderaxespad=0.0, ncol=1 if many else _NCOL, columnspacing=1.0, handlelength=1.5)
    if many:
        _colorbar(ax, indices)


def _legend_height(layers: int, guide: bool) -> float:
    """Height of a layer legend (entries for the layers and the guide, or a colour bar)."""
    if layers > _MAX_LEGEND_LAYERS:
        return _style.legend_height(1, 1) + 0.2
    return _style.legend_height(layers + int(guide), _NCOL)


def _colorbar(ax: Axes, indices: pd.Series) -> None:
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    lo, hi = int(indices.min()), int(indices.max())
    cmap = ListedColormap(matplotlib.colormaps["viridis"](np.linspace(0.0, 0.88, 256)))  # as layer_colors
    sm = ScalarMappable(Normalize(lo, hi), cmap)
    ax.figure.colorbar(sm, ax=ax, label="layer index", location="bottom", shrink=0.8)


def plot_batch_scaling(measurements: Measurements | _style.PathLike, out: _style.PathLike | None = None,
                       pdf: bool = False, summary: pd.DataFrame | None = None) -> Figure:
    """Var(V) and Var(U) against batch size k, log-log, one line per layer (paper Fig. 4 middle).

    Variances are the channel means of the per-channel variance over draws at spatial
    fraction 1. A dashed slope -1 line shows the independent-samples model; the legend gives
    each layer's fitted slope with its bootstrap interval.

    Args:
        measurements: A ``Measurements`` or its folder (whose summary.csv is reused).
        out: Where to save the figure; None saves nothing.
        pdf: Also save a PDF next to ``out``.
        summary: A precomputed ``measurements.summary()``.

    Returns:
        The figure.
    """
    _, summary = _style.load_measurements(measurements, summary)
    rows = _style.full_fraction(summary).sort_values(["layer_index", "batch_size"])
    colors = _style.layer_colors(rows["layer_index"])
    with _style.style():
        fig, axes, legends = _style.figure_with_legend_rows(
            1, 2, _PANEL_W, _PANEL_H, [_legend_height(rows["layer_index"].nunique(), True)])
        for ax, where, (stat, big) in zip(axes[0], legends[0], _STATS):
            for (index, name), g in rows.groupby(["layer_index", "layer"], sort=True):
                first = g.iloc[0]
                slope = _style.fmt_slope(first[f"slope_{stat}"], first.get(f"slope_{stat}_lo"),
                                         first.get(f"slope_{stat}_hi"))
                ax.plot(g["batch_size"], g[f"var_{stat}"], marker="o", ms=4, lw=1.4,
                        color=colors[int(index)], label=f"{int(index)} {name}: {slope}")
            mid = rows.groupby("batch_size")[f"var_{stat}"].apply(lambda s: np.exp(np.log(s).mean()))
            slope_guide(ax, mid.index.to_numpy(), mid.to_numpy())
            _log_axes(ax)
            _ticks(ax, rows["batch_size"])
            ax.set_xlabel("batch size k")
            ax.set_ylabel(f"Var({big})")
            ax.set_title(f"Var({big}) against batch size")
            _layer_legend(ax, where, rows["layer_index"], rows[f"slope_{stat}"], "layer: slope [95% CI]")
        fig.suptitle("Scaling of BN noise with batch size (log-log)")
        return _style.finish(fig, out, pdf)


def _per_z_line(ax: Axes, g: pd.DataFrame, column: str, color: object, label: str) -> None:
    """Markers per layer and a line through the geometric mean at each spatial size."""
    ax.scatter(g["spatial_size"], g[column], color=color, s=18, alpha=0.75, zorder=3)
    mean = g.groupby("spatial_size")[column].apply(lambda s: np.exp(np.log(s).mean()))
    ax.plot(mean.index, mean.to_numpy(), color=color, lw=1.5, marker="D", ms=4, zorder=4, label=label)


def _across_layers(axes: Sequence[Axes], legends: Sequence[Axes], rows: pd.DataFrame) -> None:
    """Top row: k*Var against the layers' spatial sizes, one line per batch size."""
    colors = _style.batch_colors(rows["batch_size"])
    rows = rows.assign(kv=rows["var_v"] * rows["batch_size"], ku=rows["var_u"] * rows["batch_size"])
    for ax, where, (stat, big) in zip(axes, legends, _STATS):
        for k, g in rows.groupby("batch_size"):
            _per_z_line(ax, g, f"k{stat}", colors[int(k)], f"k = {int(k)}")
        slope_guide(ax, rows["spatial_size"], rows[f"k{stat}"])
        _log_axes(ax)
        _ticks(ax, rows["spatial_size"])
        ax.set_xlabel("spatial size z of the layer (positions per channel)")
        ax.set_ylabel(f"k \u00b7 Var({big})")
        ax.set_title(f"k\u00b7Var({big}) across layers (dots: layers, line: mean per z)")
        handles, labels = ax.get_legend_handles_labels()
        where.legend(handles, labels, fontsize=7, loc="upper center", borderaxespad=0.0,
                     ncol=len(labels), columnspacing=1.0, handlelength=1.5)


def _within_layers(axes: Sequence[Axes], legends: Sequence[Axes], rows: pd.DataFrame,
                   spatial: pd.DataFrame, k: int) -> None:
    """Bottom row: Var against the used positions z*fraction, one line per layer, at batch size k."""
    rows = rows[rows["batch_size"] == k].sort_values(["layer_index", "fraction"])
    rows = rows.assign(positions=rows["n"] / rows["batch_size"])  # max(1, round(z * fraction))
    colors = _style.layer_colors(rows["layer_index"])
    slopes = spatial[spatial["batch_size"] == k].set_index("layer")
    for ax, where, (stat, big) in zip(axes, legends, _STATS):
        for (index, name), g in rows.groupby(["layer_index", "layer"], sort=True):
            s = slopes.loc[name] if name in slopes.index else None
            text = _style.fmt_slope(s[f"slope_{stat}"]) if s is not None else "n/a"
            ax.plot(g["positions"], g[f"var_{stat}"], marker="o", ms=4, lw=1.4,
                    color=colors[int(index)], label=f"{int(index)} {name}: {text}")
        slope_guide(ax, rows["positions"], rows[f"var_{stat}"])
        _log_axes(ax)
        _ticks(ax, rows["positions"])
        ax.set_xlabel("positions used z \u00b7 fraction")
        ax.set_ylabel(f"Var({big})")
        ax.set_title(f"Var({big}) within each layer, spatial subsets (k={k})")
        layer_slopes = rows["layer"].map(slopes[f"slope_{stat}"]) if len(slopes) else rows["n"] * np.nan
        _layer_legend(ax, where, rows["layer_index"], layer_slopes, "layer: slope")


def plot_spatial_scaling(measurements: Measurements | _style.PathLike, out: _style.PathLike | None = None,
                         pdf: bool = False, summary: pd.DataFrame | None = None,
                         batch_size: int | None = None) -> Figure:
    """k*Var(V) and k*Var(U) against the layers' spatial sizes (paper Fig. 4 right).

    Top row: at spatial fraction 1, one line per batch size across layers (dots are layers,
    the line joins the geometric means at each spatial size); a dashed slope -1 line is the
    independent-positions model ``Var ~ 1/(k z)``. When spatial fractions below 1 were
    measured, a second row shows, at one batch size, the variance within each layer against
    the number of positions used ``z * fraction``, with the fitted slopes.

    Args:
        measurements: A ``Measurements`` or its folder (whose summary.csv is reused).
        out: Where to save the figure; None saves nothing.
        pdf: Also save a PDF next to ``out``.
        summary: A precomputed ``measurements.summary()``.
        batch_size: Batch size of the second row (default 32 if measured, else the middle one).

    Returns:
        The figure.

    Raises:
        BnprobeError: If ``batch_size`` was not measured.
    """
    m, summary = _style.load_measurements(measurements, summary, n_boot=0)  # no slopes shown
    k = _style.check_batch_size(batch_size, m.batch_sizes)
    within = summary["fraction"].nunique() > 1
    with _style.style():
        heights = [_style.legend_height(1, 1, title=False)]
        if within:
            heights.append(_legend_height(summary["layer_index"].nunique(), True))
        fig, axes, legends = _style.figure_with_legend_rows(len(heights), 2, _PANEL_W, _PANEL_H, heights)
        _across_layers(axes[0], legends[0], _style.full_fraction(summary))
        if within:
            _within_layers(axes[1], legends[1], summary, m.spatial_summary(n_boot=0), k)
        fig.suptitle("Scaling of BN noise with spatial size (log-log)")
        return _style.finish(fig, out, pdf)
