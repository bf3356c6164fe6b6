"""Fitted BN noise levels per layer with their per-channel spread; learned noise over training."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np

from ..errors import BnprobeError
from ..layout import FITTED, METRICS
from ..noise.spec import NoiseSpec
from . import _style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..measure.measurements import Measurements

NoiseSource = Union[NoiseSpec, "Measurements", str, Path]


def load_noise(source: NoiseSource, batch_size: int | None = None) -> NoiseSpec:
    """A ``NoiseSpec`` from a spec, a fitted.json, a measurements folder or ``Measurements``.

    A folder is read through its fitted.json when it has one (``batch_size`` must then be
    None or match); otherwise the noise is fitted from its measurements.

    Args:
        source: A ``NoiseSpec``, ``Measurements``, noise file, or measurement folder.
        batch_size: Batch size to fit measurements at (default 32 if measured, else the middle).

    Returns:
        The noise specification.

    Raises:
        BnprobeError: If the path does not exist or cannot be read, or the batch size is not
            available.
    """
    from ..measure.measurements import Measurements

    if isinstance(source, NoiseSpec):
        spec = source
    elif isinstance(source, Measurements):
        return _fit(source, batch_size)
    else:
        path = Path(source)
        if path.is_dir():
            if not (path / FITTED).is_file():
                return _fit(Measurements.load(path), batch_size)
            path = path / FITTED
        elif not path.exists():
            raise BnprobeError(f"noise file or measurements folder not found: {path} "
                               "(run bnprobe measure or bnprobe fit first)")
        spec = NoiseSpec.load(path)
    if batch_size is not None and int(batch_size) != spec.batch_size:
        raise BnprobeError(f"the noise file is for batch size {spec.batch_size}, not {batch_size} "
                           "(run bnprobe fit --batch-size to make one)")
    return spec


def _fit(m: Measurements, batch_size: int | None) -> NoiseSpec:
    from ..measure.fit import fit_noise

    return fit_noise(m, _style.check_batch_size(batch_size, m.batch_sizes))


def _nominal_sigma(stat: str, n: float) -> float:
    """Standard deviation of V or U for n independent values (NaN when undefined)."""
    from ..stats import u_moments

    if stat == "v":
        return 1.0 / math.sqrt(n) if n > 0 else math.nan
    return math.sqrt(u_moments(n)[1]) if n > 3 else math.nan


def _panel(ax: Axes, layers: list[dict[str, Any]], stat: str, big: str) -> None:
    """Box and strip of channel sigmas, the layer sigma, and the nominal sigma per layer."""
    rng = np.random.default_rng(0)
    x = np.array([int(layer["index"]) for layer in layers], dtype=float)
    channels = [np.asarray(layer[f"sigma_{stat}_channels"], dtype=float) for layer in layers]
    ax.boxplot(channels, positions=x, widths=0.55, showfliers=False, patch_artist=True,
               boxprops={"facecolor": "#cfe0f1", "edgecolor": "0.35"},
               medianprops={"color": "C0", "lw": 1.5}, whiskerprops={"color": "0.35"},
               capprops={"color": "0.35"}, zorder=2)
    for xi, values in zip(x, channels):
        jitter = rng.uniform(-0.18, 0.18, size=values.size)
        ax.scatter(xi + jitter, values, s=5, color="C0", alpha=0.45, lw=0, zorder=3)
    ax.scatter([], [], s=12, color="C0", alpha=0.6, label="channels (box: quartiles, 1.5 IQR)")
    ax.plot(x, [layer[f"sigma_{stat}"] for layer in layers], "D", color="C3", ms=6, zorder=4,
            label="layer \u03c3 (root of the channel-mean variance)")
    nominal = [_nominal_sigma(stat, float(layer["n"])) for layer in layers]
    ax.plot(x, nominal, "_", color="0.1", ms=18, mew=2.2, zorder=5,
            label="\u03c3 for n = k z independent values")
    ax.set_yscale("log")
    ax.set_ylabel(rf"$\sigma_{big}$")
    definition = r"$V = (\mu - M)/\sigma$" if stat == "v" else r"$U = \sigma/S$"
    ax.set_title(f"standard deviation of {definition} (log scale)", fontsize=10)
    ax.grid(True, which="minor", axis="y", alpha=0.25)


def plot_noise(noise: NoiseSource, out: _style.PathLike | None = None, pdf: bool = False,
               batch_size: int | None = None) -> Figure:
    """sigma_V and sigma_U per layer with the spread over channels, at the spec's batch size.

    Each layer (x = layer index, named on the tick labels) shows a box and the points of its
    channels' sigmas, the layer sigma (root of the channel-mean variance) and, for reference,
    the sigma of independent values (``1/sqrt(n)`` for V, the exact sd of U, ``n = k z``).

    Args:
        noise: A ``NoiseSpec``, ``Measurements``, a fitted.json, or a measurement folder.
        out: Where to save the figure; None saves nothing.
        pdf: Also save a PDF next to ``out``.
        batch_size: Batch size when fitting from measurements (must match a noise file's).

    Returns:
        The figure.
    """
    spec = load_noise(noise, batch_size)
    layers = sorted(spec.layers, key=lambda layer: int(layer["index"]))
    width = min(14.0, max(6.5, 0.55 * len(layers) + 3.0))
    with _style.style():
        fig, axes = _style.new_figure(2, 1, width, 3.3, sharex=True)
        for ax, (stat, big) in zip(axes[:, 0], (("v", "V"), ("u", "U"))):
            _panel(ax, layers, stat, big)
        bottom = axes[1, 0]
        bottom.set_xticks([int(layer["index"]) for layer in layers])
        bottom.set_xticklabels([f"{int(layer['index'])} {layer['name']}" for layer in layers],
                               rotation=35, ha="right", fontsize=8)
        bottom.set_xlabel("BN layer")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8.5)
        fig.suptitle(f"BN noise per layer at batch size k = {spec.batch_size}")
        return _style.finish(fig, out, pdf)


SIGMA_PREFIX = "sigma_rel_"
_RUN_STYLES = ("-", "--", ":", "-.")


def _sigma_columns(table: Any) -> list[str]:
    """``sigma_rel_1, sigma_rel_2, ...`` of a metrics table, in layer order."""
    cols = [c for c in table.columns if c.startswith(SIGMA_PREFIX) and c[len(SIGMA_PREFIX):].isdigit()]
    return sorted(cols, key=lambda c: int(c[len(SIGMA_PREFIX):]))


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a training run folder (it has a metrics.csv)."""
    return Path(path).is_dir() and (Path(path) / METRICS).is_file()


def plot_noise_trajectory(run_dirs: Sequence[str | Path], labels: Sequence[str] | None = None,
                          out: _style.PathLike | None = None, pdf: bool = False) -> Figure:
    """Learned noise sigma_S/s per layer over the epochs of runs, and its last-epoch profile.

    Reads the ``sigma_rel_<layer>`` columns of each run's metrics.csv (the geometric mean over channels
    of sigma_S/|s| after each epoch, written by training with ``--learn-noise``). Left: one
    line per layer (colour) and run (line style) against the epoch; right: the profile over
    the layers after the last epoch, one line per run. Both on log scales, so runs started at
    different sigma_S/s can be compared.

    Args:
        run_dirs: Run folders of ``bnprobe train``/``retrain`` with learned noise.
        labels: One legend label per run (default: folder name and norm).
        out: Where to save the figure; None saves nothing.
        pdf: Also save a PDF next to ``out``.

    Returns:
        The figure.

    Raises:
        BnprobeError: On no runs, a missing run or metrics file, a run without learned noise,
            or a label count that does not match.
    """
    from .curves import _unique, read_metrics, run_label

    if not run_dirs:
        raise BnprobeError("no run folders given")
    tables = [read_metrics(d) for d in run_dirs]
    columns = [_sigma_columns(t) for t in tables]
    for run, cols in zip(run_dirs, columns):
        if not cols:
            raise BnprobeError(f"{run} has no learned noise (no {SIGMA_PREFIX}* columns in its metrics.csv; "
                               "train with --learn-noise layer|channel)")
    if labels is None:
        labels = _unique([run_label(d) for d in run_dirs])
    elif len(labels) != len(run_dirs):
        raise BnprobeError(f"{len(labels)} labels for {len(run_dirs)} runs")
    layers = sorted({int(c[len(SIGMA_PREFIX):]) for cols in columns for c in cols})
    colors = _style.layer_colors(layers)
    run_colors = _style.run_colors(len(tables))
    with _style.style():
        fig, axes = _style.new_figure(1, 2, 5.2, 3.8)
        over_time, profile = axes[0, 0], axes[0, 1]
        for r, (table, cols, label) in enumerate(zip(tables, columns, labels)):
            style = _RUN_STYLES[r % len(_RUN_STYLES)]
            for col in cols:
                layer = int(col[len(SIGMA_PREFIX):])
                over_time.plot(table["epoch"], table[col], style, color=colors[layer], lw=1.4)
            last = table.iloc[-1]
            xs = [int(c[len(SIGMA_PREFIX):]) for c in cols]
            profile.plot(xs, [last[c] for c in cols], style, marker="o", ms=4, color=run_colors[r], lw=1.4,
                         label=f"{label} (epoch {int(last['epoch'])})")
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        plain = FuncFormatter(lambda v, _pos: f"{v:.3g}")
        for ax in (over_time, profile):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.tick_params(axis="y", which="both", labelsize=8)
            ax.set_ylabel(r"$\sigma_S / s$")
        over_time.xaxis.set_major_locator(MaxNLocator(integer=True))
        over_time.set_xlabel("epoch")
        over_time.set_title("learned noise over training", fontsize=10)
        profile.set_xlabel("normalized layer")
        profile.set_xticks(layers)
        profile.set_title("after the last epoch", fontsize=10)
        from matplotlib.lines import Line2D

        keys = [Line2D([], [], color=colors[layer], lw=2, label=f"layer {layer}") for layer in layers]
        keys += [Line2D([], [], ls=_RUN_STYLES[r % len(_RUN_STYLES)], color="0.3", lw=1.4, label=label)
                 for r, label in enumerate(labels)]
        fig.legend(handles=keys, loc="outside lower center", ncol=min(len(keys), 6), fontsize=8)
        profile.legend(fontsize=7.5, loc="best")
        fig.suptitle(r"Learned noise $\sigma_S / s$ per layer (geometric mean over channels)")
        return _style.finish(fig, out, pdf)
