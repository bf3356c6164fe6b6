"""Per-epoch learning curves of several training runs overlaid, one panel per metric."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import pandas as pd

from ..errors import BnprobeError
from ..layout import CONFIG, METRICS
from . import _style

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_METRICS = ("train_loss", "train_eval_loss", "val_loss")
_NAMES = {
    "train_loss": "training loss (training mode, running average)",
    "train_eval_loss": "training loss (evaluation mode)",
    "val_loss": "validation loss",
    "train_acc": "training accuracy (training mode)",
    "train_eval_acc": "training accuracy (evaluation mode)",
    "val_acc": "validation accuracy",
    "lr": "learning rate",
}


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """The per-epoch metrics.csv of a run folder.

    Raises:
        BnprobeError: If the folder or its metrics.csv is missing or unreadable.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise BnprobeError(f"run folder not found: {run}")
    path = run / METRICS
    if not path.is_file():
        raise BnprobeError(f"{run} has no {METRICS} (not a bnprobe train run, or no epoch finished)")
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise BnprobeError(f"cannot read {path}: {exc}") from exc
    if "epoch" not in table.columns:
        raise BnprobeError(f"{path} has no 'epoch' column")
    return table


def run_label(run_dir: str | Path) -> str:
    """``<folder name> (<norm>)`` with the norm from config.json, or the folder name alone."""
    run = Path(run_dir)
    name = run.resolve().name or str(run)
    try:
        norm = json.loads((run / CONFIG).read_text(encoding="utf-8"))["config"]["norm"]
    except (OSError, ValueError, KeyError, TypeError):
        return name
    return name if norm == name else f"{name} ({norm})"


def _unique(labels: list[str]) -> list[str]:
    """Make repeated labels distinct by numbering them."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f"{label} #{seen[label]}")
    return out


def _log_scale(metric: str, tables: Sequence[pd.DataFrame], log_loss: bool) -> bool:
    """Whether a metric's panel uses a log y axis: the learning rate, and losses if asked."""
    if metric != "lr" and not (log_loss and _kind(metric) == "loss"):
        return False
    values = [t[metric].dropna() for t in tables if metric in t.columns]
    return all(bool((v > 0).all()) for v in values)


def _kind(metric: str) -> str:
    return "loss" if "loss" in metric else "acc" if metric.endswith("acc") else metric


def plot_curves(run_dirs: Sequence[str | Path], metrics: Sequence[str] = DEFAULT_METRICS,
                labels: Sequence[str] | None = None, out: _style.PathLike | None = None,
                pdf: bool = False, log_loss: bool = True) -> Figure:
    """Per-epoch curves of several runs, one panel per metric.

    With the default metrics the panels compare the training loss in training mode (batch
    statistics, as optimized) with the training loss in evaluation mode (population
    statistics) and the validation loss. Panels of the same kind (all losses, all accuracies)
    share the y axis; losses use a log scale by default, so small late-training differences
    stay visible. A run lacking a metric is left out of that panel.

    Args:
        run_dirs: Run folders of ``bnprobe train`` (each with metrics.csv, ideally config.json).
        metrics: Numeric metrics.csv columns to plot.
        labels: Legend labels, one per run (default: folder name and norm from config.json).
        out: Where to save the figure; None saves nothing.
        pdf: Also save a PDF next to ``out``.
        log_loss: Log-scale y axes for loss metrics (when all their values are positive).

    Returns:
        The figure.

    Raises:
        BnprobeError: On no runs, a missing run or metrics file, a label count that does not
            match, or a metric no run has as a numeric column.
    """
    if not run_dirs:
        raise BnprobeError("no run folders given")
    metrics = list(dict.fromkeys(metrics))
    if not metrics:
        raise BnprobeError("no metrics given")
    tables = [read_metrics(d) for d in run_dirs]
    if labels is None:
        labels = _unique([run_label(d) for d in run_dirs])
    elif len(labels) != len(run_dirs):
        raise BnprobeError(f"{len(labels)} labels for {len(run_dirs)} runs")
    for metric in metrics:
        if not any(metric in t.columns and pd.api.types.is_numeric_dtype(t[metric]) for t in tables):
            known = sorted({c for t in tables for c in t.columns
                            if c != "epoch" and pd.api.types.is_numeric_dtype(t[c])})
            raise BnprobeError(f"no run has a numeric metric {metric!r} (available: {', '.join(known)})")
    share = len({_kind(m) for m in metrics}) == 1
    ncols = 2 if len(metrics) == 4 else min(3, len(metrics))  # 2x2 rather than 3+1
    nrows = math.ceil(len(metrics) / ncols)
    with _style.style():
        fig, axes = _style.new_figure(nrows, ncols, 4.6, 3.5, sharey=share)
        colors = _style.run_colors(len(tables))
        marker = "o" if max(len(t) for t in tables) <= 15 else None
        for ax, metric in zip(axes.flat, metrics):
            for table, label, color in zip(tables, labels, colors):
                if metric in table.columns and pd.api.types.is_numeric_dtype(table[metric]):
                    ax.plot(table["epoch"], table[metric], color=color, lw=1.6, label=label,
                            marker=marker, ms=3)
            ax.set_title(_NAMES.get(metric, metric), fontsize=10)
            ax.set_xlabel("epoch")
            ax.set_ylabel(metric)
            ax.yaxis.set_tick_params(labelleft=True)
            if _log_scale(metric, tables, log_loss):
                ax.set_yscale("log")
        for ax in list(axes.flat)[len(metrics):]:
            fig.delaxes(ax)
        entries: dict[str, object] = {}
        for ax in fig.axes:
            for handle, name in zip(*ax.get_legend_handles_labels()):
                entries.setdefault(name, handle)
        fig.legend(list(entries.values()), list(entries), loc="outside lower center",
                   ncol=min(4, len(tables)), fontsize=8.5)
        fig.suptitle("Learning curves")
        return _style.finish(fig, out, pdf)
