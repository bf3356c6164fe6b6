"""Shared plotting setup: Agg backend, seaborn style, colours, input resolution and saving.

Figures are built with ``matplotlib.figure.Figure`` directly (not pyplot), so nothing is kept
open in a global figure manager and many figures can be made in one process.
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence, Union

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # leave an interactive session's backend alone
    matplotlib.use("Agg")

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from ..errors import BnprobeError
from ..io import atomic_write
from ..layout import SUMMARY as SUMMARY_CSV

if TYPE_CHECKING:
    from ..measure.measurements import Measurements

PathLike = Union[str, Path]
DPI = 150
_SUMMARY_NEEDS = ("layer", "layer_index", "batch_size", "fraction", "spatial_size", "n", "var_v", "var_u",
                  "n_eff", "ks_p", "ks_p_fit", "slope_v", "slope_u", "channels")


def _rc() -> dict[str, Any]:
    rc = dict(sns.axes_style("whitegrid"))
    rc.update(sns.plotting_context("paper", font_scale=1.15))
    rc.update({"figure.dpi": DPI, "savefig.dpi": DPI, "legend.framealpha": 0.9,
               "axes.titleweight": "bold", "figure.titleweight": "bold"})
    return rc


@contextlib.contextmanager
def style() -> Iterator[None]:
    """Apply the bnprobe style (seaborn whitegrid, paper context) within the block."""
    with matplotlib.rc_context(_rc()):
        yield


def new_figure(nrows: int = 1, ncols: int = 1, width: float = 4.0, height: float = 3.2,
               **subplot_kw: Any) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure with a grid of axes (always returned as a 2-D array).

    Args:
        nrows: Rows of panels.
        ncols: Columns of panels.
        width: Width of one panel in inches.
        height: Height of one panel in inches.
        **subplot_kw: Passed to ``Figure.subplots`` (e.g. ``sharex``).

    Returns:
        ``(figure, axes)``.
    """
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def figure_with_legend_rows(nrows: int, ncols: int, width: float, height: float,
                           legend_heights: Sequence[float]) -> tuple[Figure, np.ndarray, np.ndarray]:
    """Panels with an axis-less strip under each row for legends, so they never cover data.

    Args:
        nrows: Rows of panels.
        ncols: Columns of panels.
        width: Width of one panel in inches.
        height: Height of one panel row in inches.
        legend_heights: Height in inches of the legend strip under each row.

    Returns:
        ``(figure, axes, legend_axes)``, both arrays of shape ``(nrows, ncols)``.
    """
    ratios = [h for row in range(nrows) for h in (height, legend_heights[row])]
    fig = Figure(figsize=(width * ncols, sum(ratios)), dpi=DPI, layout="constrained")
    grid = fig.subplots(2 * nrows, ncols, squeeze=False, gridspec_kw={"height_ratios": ratios})
    for ax in grid[1::2].flat:
        ax.axis("off")
    return fig, grid[0::2], grid[1::2]


def legend_height(entries: int, ncol: int, title: bool = True) -> float:
    """Inches needed by a small-font legend of ``entries`` items in ``ncol`` columns."""
    return 0.2 + 0.17 * math.ceil(entries / ncol) + (0.18 if title else 0.0)


def layer_colors(indices: Sequence[int]) -> dict[int, Any]:
    """A sequential colour per layer index (dark = first layer, light = last)."""
    cmap = matplotlib.colormaps["viridis"]
    uniq = sorted({int(i) for i in indices})
    if len(uniq) == 1:
        return {uniq[0]: cmap(0.0)}
    lo, hi = uniq[0], uniq[-1]
    return {i: cmap(0.88 * (i - lo) / (hi - lo)) for i in uniq}


def batch_colors(batch_sizes: Sequence[int]) -> dict[int, Any]:
    """A distinct colour per batch size."""
    sizes = sorted({int(k) for k in batch_sizes})
    palette = sns.color_palette("rocket", n_colors=len(sizes) + 1)
    return {k: palette[i] for i, k in enumerate(sizes)}


def run_colors(count: int) -> list[Any]:
    """Distinct colours for ``count`` runs."""
    return list(sns.color_palette("tab10" if count <= 10 else "husl", count))


def default_batch_size(batch_sizes: Sequence[int]) -> int:
    """32 when measured, else the middle measured batch size."""
    sizes = sorted(int(k) for k in batch_sizes)
    return 32 if 32 in sizes else sizes[len(sizes) // 2]


def check_batch_size(batch_size: int | None, measured: Sequence[int]) -> int:
    """Return ``batch_size`` (or the default) after checking it was measured."""
    measured = sorted(int(k) for k in measured)
    if not measured:
        raise BnprobeError("the measurements hold no samples")
    if batch_size is None:
        return default_batch_size(measured)
    if int(batch_size) not in measured:
        raise BnprobeError(f"batch size {batch_size} was not measured "
                           f"(measured: {', '.join(map(str, measured))})")
    return int(batch_size)


def fmt_p(p: float) -> str:
    """A p-value in a short form (``0.23``, ``3e-05``, ``<1e-300``)."""
    if p is None or not math.isfinite(p):
        return "n/a"
    if p == 0.0:
        return "<1e-300"
    return f"{p:.2f}" if p >= 0.01 else f"{p:.0e}"


def fmt_slope(value: float, lo: float | None = None, hi: float | None = None) -> str:
    """A slope with its interval when known, e.g. ``-0.98 [-1.05, -0.91]``."""
    if not math.isfinite(value):
        return "n/a"
    text = f"{value:+.2f}"
    if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
        text += f" [{lo:+.2f}, {hi:+.2f}]"
    return text.replace("-", "\u2212")


def load_measurements(measurements: Measurements | PathLike,
                      summary: pd.DataFrame | None = None, n_boot: int = 200,
                      seed: int = 0, compute: bool = True) -> tuple[Measurements, pd.DataFrame | None]:
    """Measurements and their summary table, loading a folder when given a path.

    A folder's ``summary.csv`` (written by ``bnprobe measure``) is used when it matches the
    samples; otherwise the summary is computed.

    Args:
        measurements: A ``Measurements`` or the folder it was saved to.
        summary: A precomputed ``measurements.summary()`` (used as is).
        n_boot: Bootstrap replicates when the summary has to be computed (0: no intervals).
        seed: Seed of that bootstrap.
        compute: Compute a missing summary; with False it comes back as None.

    Returns:
        ``(measurements, summary)``.
    """
    from ..measure.measurements import Measurements

    folder = None
    if not isinstance(measurements, Measurements):
        folder = Path(measurements)
        measurements = Measurements.load(folder)
    if summary is None and folder is not None and (folder / SUMMARY_CSV).is_file():
        try:
            cached = pd.read_csv(folder / SUMMARY_CSV)
        except (OSError, ValueError):
            cached = None
        if cached is not None and _summary_matches(cached, measurements.samples):
            summary = cached
    if summary is None and compute:
        summary = measurements.summary(n_boot=n_boot, seed=seed)
    return measurements, summary


def _summary_matches(summary: pd.DataFrame, samples: pd.DataFrame) -> bool:
    """Whether a stored summary has the needed columns and the samples' groups."""
    if any(c not in summary.columns for c in _SUMMARY_NEEDS):
        return False
    keys = ["layer", "batch_size", "fraction"]
    want = set(samples[keys].drop_duplicates().itertuples(index=False, name=None))
    have = set(summary[keys].itertuples(index=False, name=None))
    return {(a, int(b), round(float(c), 9)) for a, b, c in want} == \
        {(a, int(b), round(float(c), 9)) for a, b, c in have}


def full_fraction(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows at spatial fraction 1 (the largest measured fraction if 1 is absent)."""
    fractions = frame["fraction"].astype(float)
    return frame[np.isclose(fractions, fractions.max())]


def figure_paths(out: PathLike, pdf: bool = False) -> list[Path]:
    """The files ``save_figure`` writes: ``out`` (``.png`` added if it has no suffix), plus a PDF."""
    path = Path(out)
    if not path.suffix:
        path = path.with_suffix(".png")
    paths = [path]
    if pdf and path.suffix.lower() != ".pdf":
        paths.append(path.with_suffix(".pdf"))
    return paths


def save_figure(fig: Figure, out: PathLike | None, pdf: bool = False) -> list[Path]:
    """Write ``fig`` atomically (overwriting an existing figure file) at ``DPI``.

    Args:
        fig: The figure.
        out: Destination; its suffix picks the format (``.png`` when none). None saves nothing.
        pdf: Also write a PDF next to it (same name, ``.pdf``).

    Returns:
        The paths written.
    """
    if out is None:
        return []
    paths = figure_paths(out, pdf)
    for path in paths:
        fmt = path.suffix.lstrip(".").lower()
        try:
            atomic_write(path, lambda p, fmt=fmt: fig.savefig(p, format=fmt, dpi=DPI, bbox_inches="tight"))
        except ValueError as exc:  # unsupported format
            raise BnprobeError(f"cannot save {path}: {exc}") from exc
        except OSError as exc:
            raise BnprobeError(f"cannot write {path}: {exc}") from exc
    return paths


def finish(fig: Figure, out: PathLike | None, pdf: bool) -> Figure:
    """Save (when ``out`` is given) and return the figure."""
    save_figure(fig, out, pdf)
    return fig
