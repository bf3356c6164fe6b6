"""Selective prediction (error-coverage) and robustness curves from ``bnprobe evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd
from matplotlib.figure import Figure

from ..errors import BnprobeError
from ..evaluation.labels import evaluation_label
from ..layout import COVERAGE, EVALUATION, ROBUSTNESS, evaluation_dir
from ._style import finish, new_figure, run_colors, style


def _evaluation_dir(run: str | Path) -> Path:
    run = Path(run)
    return evaluation_dir(run) if evaluation_dir(run).is_dir() else run


def _label(folder: Path, with_mc: bool) -> str:
    import json

    try:
        return evaluation_label(json.loads((folder / EVALUATION).read_text()), with_mc)
    except (OSError, ValueError):
        return folder.parent.name


def _read(runs: Sequence[str | Path], name: str, with_mc: bool = False) -> list[tuple[str, pd.DataFrame]]:
    out = []
    for run in runs:
        folder = _evaluation_dir(run)
        path = folder / name
        if not path.is_file():
            raise BnprobeError(f"{path} not found: run `bnprobe evaluate {run}` (with --robustness) first")
        out.append((f"{_label(folder, with_mc)} [{Path(run).name}]", pd.read_csv(path)))
    return out


def _legend_below(fig: Figure, axes) -> None:
    """One legend under the panels, so it never covers a curve."""
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=7)


def _curve(t: pd.DataFrame, method: str, kind: str) -> tuple[pd.DataFrame, bool]:
    """The coverage curve of ``method``; a deterministic run (only mc1) falls back to single."""
    sel = t[(t["method"] == method) & (t["uncertainty"] == kind)]
    deterministic = set(t["method"]) <= {"single", "mc1"}
    if sel.empty and method != "single" and deterministic:
        return t[(t["method"] == "single") & (t["uncertainty"] == kind)].sort_values("coverage"), True
    return sel.sort_values("coverage"), False


def plot_coverage(runs: Sequence[str | Path], method: str = "single", out: str | Path | None = None,
                  pdf: bool = False) -> Figure:
    """Error among accepted inputs against coverage, one panel per uncertainty measure.

    Args:
        runs: Run directories (or their evaluation folders).
        method: Which prediction: ``single`` or an MC method such as ``mc10``.
        out: Where to save the PNG.
        pdf: Also save a PDF.
    """
    tables = _read(runs, COVERAGE, with_mc=method != "single")
    with style():
        fig, axes = new_figure(1, 2, width=4.6, height=3.6, sharey=True)
        colors = run_colors(len(tables))
        for ax, kind in zip(axes[0], ("entropy", "max_prob")):
            for color, (label, t) in zip(colors, tables):
                sel, fallback = _curve(t, method, kind)
                if sel.empty:
                    raise BnprobeError(f"no coverage curve for method {method!r} in {label}")
                ax.plot(sel["coverage"], sel["error"], color=color,
                        label=label + (" (deterministic: single pass)" if fallback else ""))
            ax.set_title(f"reject by {'predictive entropy' if kind == 'entropy' else '1 - max probability'}")
            ax.set_xlabel("coverage")
            ax.set_xlim(0, 1)
        axes[0, 0].set_ylabel("error among accepted")
        _legend_below(fig, axes)
        fig.suptitle(f"Selective prediction ({method})")
        return finish(fig, out, pdf)


def plot_robustness(runs: Sequence[str | Path], out: str | Path | None = None, pdf: bool = False) -> Figure:
    """Accuracy against Gaussian input noise and against FGSM strength, runs overlaid."""
    tables = _read(runs, ROBUSTNESS)
    with style():
        fig, axes = new_figure(1, 2, width=4.6, height=3.6, sharey=True)
        colors = run_colors(len(tables))
        for ax, attack in zip(axes[0], ("gaussian", "fgsm")):
            for color, (label, t) in zip(colors, tables):
                sel = t[t["attack"] == attack].sort_values("strength")
                ax.plot(sel["strength"], sel["accuracy"], marker="o", color=color, label=label)
            ax.set_title("Gaussian noise (std)" if attack == "gaussian" else "FGSM (epsilon)")
            ax.set_xlabel("strength on the normalized input")
        axes[0, 0].set_ylabel("accuracy")
        _legend_below(fig, axes)
        fig.suptitle("Robustness of the deterministic prediction")
        return finish(fig, out, pdf)
