"""The study report: mean and standard deviation over seeds per method, and three figures.

Everything is read from the files the steps wrote: a training run's ``config.json`` and
``metrics.csv``, an evaluation's ``metrics.json`` and a measurement's ``fitted.json``. The
tables hold no timings or dates, so a resumed study reports exactly what an uninterrupted one
does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .._version import __version__
from ..io import atomic_write, atomic_write_text
from .spec import TRAINING, Study

FIGURES = "figures"
FIG_EPOCHS = "study_nll_epochs.png"
FIG_SCALE = "study_noise_scale.png"
FIG_PROFILE = "study_learned_noise.png"
#: Column, heading and format of the test-set table.
TEST_COLUMNS = [("accuracy", "accuracy", ".4f"), ("nll", "NLL", ".4f"), ("nll_mc", "NLL MC-{mc}", ".4f"),
                ("accuracy_mc", "accuracy MC-{mc}", ".4f"), ("ece", "ECE", ".4f")]
GAP_COLUMNS = [("train_acc", "train acc (train mode)", ".4f"), ("train_eval_acc", "train acc", ".4f"),
               ("val_acc", "val acc", ".4f"), ("acc_gap", "acc gap", ".4f"),
               ("train_eval_loss", "train NLL", ".4f"), ("val_loss", "val NLL", ".4f"),
               ("nll_gap", "NLL gap", ".4f")]


@dataclass
class Written:
    """What write_report wrote.

    Attributes:
        markdown: The report's text.
        files: The files written.
        runs: One row per step of a method and seed.
        table: One row per method (mean and std).
    """

    markdown: str
    files: list[Path] = field(default_factory=list)
    runs: pd.DataFrame | None = None
    table: pd.DataFrame | None = None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _training_row(run_dir: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """Configuration and final-epoch numbers of a run directory, and its metrics.csv."""
    config = _read_json(run_dir / "config.json")["config"]
    metrics = pd.read_csv(run_dir / "metrics.csv")
    last = metrics.iloc[-1]
    noise = config.get("noise")
    learn = str(config.get("learn_noise") or "off")
    row: dict[str, Any] = {
        "norm": config.get("norm"), "epochs": int(last["epoch"]),
        "norm_batch": config.get("norm_batch"),
        "noise_scale": float(config.get("noise_scale", 1.0)) if noise and learn == "off" else math.nan,
        "learn_noise": learn, "fixed_noise": bool(noise) and learn == "off",
        "train_acc": float(last["train_acc"]), "train_eval_acc": float(last["train_eval_acc"]),
        "val_acc": float(last["val_acc"]), "train_eval_loss": float(last["train_eval_loss"]),
        "val_loss": float(last["val_loss"]),
        "val_loss_mc": float(last["val_loss_mc"]) if "val_loss_mc" in last else math.nan,
    }
    row["acc_gap"] = row["train_eval_acc"] - row["val_acc"]
    row["nll_gap"] = row["val_loss"] - row["train_eval_loss"]
    for col in metrics.columns:
        if col.startswith("sigma_rel_") and col != "sigma_rel_mean":
            row[col] = float(last[col])
    return row, metrics


#: The evaluation columns of a training run that was not evaluated (``evaluate = false``).
NOT_EVALUATED = {"accuracy": math.nan, "nll": math.nan, "ece": math.nan, "nll_mc": math.nan,
                 "accuracy_mc": math.nan, "mc_mode": "", "split": "", "n_test": math.nan}


def _evaluation_row(path: Path, mc: int) -> dict[str, Any]:
    if not path.is_file():
        return dict(NOT_EVALUATED)
    doc = _read_json(path)
    m = doc["metrics"]
    single = m["single"]
    mc_row = m.get(f"mc{mc}", {})
    return {"accuracy": single["accuracy"], "nll": single["nll"], "ece": single["ece"],
            "nll_mc": mc_row.get("nll", math.nan), "accuracy_mc": mc_row.get("accuracy", math.nan),
            "mc_mode": m.get("mc_mode", ""), "split": doc["config"]["split"], "n_test": doc["config"]["n"]}


def collect(study: Study, root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Tidy frames of a finished study.

    Returns:
        ``(runs, curves, fitted)``: one row per evaluated method and seed; per epoch the NLL of
        each training run on the training subset (evaluation mode) and the validation split;
        per layer BN's fitted sigma_u of each measurement.
    """
    root = Path(root)
    steps = study.steps
    runs, curves, fitted = [], [], []
    for step in steps.values():
        run = study.runs[step.method]
        base = {"method": step.method, "label": run["label"], "seed": step.seed, "command": step.command}
        if step.command in TRAINING:
            row, metrics = _training_row(root / step.out)
            for split, col in (("train (eval mode)", "train_eval_loss"), ("validation", "val_loss")):
                curves += [{"method": step.method, "label": run["label"], "seed": step.seed,
                            "epoch": int(e), "split": split, "nll": float(v)}
                           for e, v in zip(metrics["epoch"], metrics[col])]
            evaluation = root / step.out / "evaluation" / "metrics.json"
            runs.append({**base, **row, **_evaluation_row(evaluation, study.report.mc)})
        elif step.command == "evaluate" and not step.auto:
            target = steps[step.refs["target"]]
            row, _ = _training_row(root / target.out)
            row["command"] = f"evaluate {target.method}"
            runs.append({**base, **row, **_evaluation_row(root / step.out / "metrics.json", study.report.mc)})
        elif step.command == "measure":
            doc = _read_json(root / step.out / "fitted.json")
            fitted += [{"method": step.method, "label": run["label"], "seed": step.seed, "layer": i + 1,
                        "sigma_u": float(layer["sigma_u"]), "batch_size": int(doc["batch_size"])}
                       for i, layer in enumerate(doc["layers"])]
    return pd.DataFrame(runs), pd.DataFrame(curves), pd.DataFrame(fitted)


def _method_order(study: Study, names: Any) -> list[str]:
    present = list(dict.fromkeys(names))
    first = [m for m in study.report.methods if m in present]
    return first + [m for m in study.runs if m in present and m not in first]


def aggregate(runs: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Mean and sample standard deviation over seeds of every numeric column, per method."""
    numeric = [c for c in runs.columns if c not in ("seed", "n_test")
               and pd.api.types.is_numeric_dtype(runs[c]) and not pd.api.types.is_bool_dtype(runs[c])]
    grouped = runs.groupby("method", sort=False)
    table = grouped[["label", "command", "norm", "learn_noise", "mc_mode"]].first()
    table.insert(0, "n_seeds", grouped.size())
    mean, std = grouped[numeric].mean(), grouped[numeric].std(ddof=1)
    for col in numeric:
        table[f"{col}_mean"], table[f"{col}_std"] = mean[col], std[col]
    return table.loc[order].reset_index()


def _cell(mean: float, std: float, fmt: str) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    text = format(mean, fmt)
    return text if std is None or math.isnan(std) else f"{text} ± {format(std, fmt)}"


def _plain(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _md_table(table: pd.DataFrame, columns: list[tuple[str, str, str]], mc: int,
              lead: list[tuple[str, str]]) -> str:
    heads = [h for _, h in lead] + [h.format(mc=mc) for _, h, _ in columns]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    for _, row in table.iterrows():
        cells = [_plain(row[c]) for c, _ in lead]
        cells += [_cell(row.get(f"{c}_mean", math.nan), row.get(f"{c}_std", math.nan), f)
                  for c, _, f in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _sigma_table(runs: pd.DataFrame, fitted: pd.DataFrame, order: list[str]) -> str:
    cols = sorted((c for c in runs.columns if c.startswith("sigma_rel_")),
                  key=lambda c: int(c.rsplit("_", 1)[1]))
    if not cols:
        return ""
    learned = runs[runs[cols].notna().any(axis=1)]
    heads = ["method", *[c.rsplit("_", 1)[1] for c in cols]]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    for method in [m for m in order if m in set(learned["method"])]:
        part = learned[learned["method"] == method]
        cells = [_cell(part[c].mean(), part[c].std(ddof=1), ".3g") for c in cols]
        lines.append(f"| {part['label'].iloc[0]} | " + " | ".join(cells) + " |")
    if not fitted.empty:
        for _method, part in fitted.groupby("method", sort=False):
            by_layer = part.groupby("layer")["sigma_u"]
            mean, std = by_layer.mean(), by_layer.std(ddof=1)
            cells = [_cell(mean.get(i + 1, math.nan), std.get(i + 1, math.nan), ".3g")
                     for i in range(len(cols))]
            k = int(part["batch_size"].iloc[0])
            name = f"{part['label'].iloc[0]}: BN's measured σ_U (k = {k})"
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _markdown(study: Study, runs: pd.DataFrame, table: pd.DataFrame, fitted: pd.DataFrame,
              figures: list[str]) -> str:
    mc = study.report.mc
    seeds = sorted(set(runs["seed"]))
    split = ", ".join(sorted(s for s in set(runs["split"]) if s)) or "test"
    n_test = ", ".join(f"{n:.0f}" for n in sorted(set(runs["n_test"].dropna()))) or "no"
    out = [f"# {study.report.title or 'Study: ' + study.name}", ""]
    if study.description:
        out += [study.description.strip(), ""]
    out += [f"Study file `{study.path.name}` (sha256 {study.sha256[:12]}), bnprobe {__version__}; "
            f"seeds {', '.join(map(str, seeds))}. Each cell: mean ± sample standard deviation over the "
            "seeds (n per method in the first table).", "",
            f"## {split.capitalize()} set ({n_test} images)", "",
            _md_table(table, TEST_COLUMNS, mc,
                      [("label", "method"), ("n_seeds", "n"), ("mc_mode", "MC mode")]),
            f"NLL in nats; MC-{mc}: the average of {mc} stochastic passes (injected or learned noise; "
            "MCBN or parametric BN for BN); — : a deterministic network (Monte Carlo = the single pass).",
            "", "## Generalization at the last epoch (metrics.csv)", "",
            _md_table(table, GAP_COLUMNS, mc, [("label", "method"), ("epochs_mean", "epochs")]),
            "train acc, train NLL: evaluation mode on a fixed subset of up to 2,000 training images "
            "(un-augmented); train acc (train mode): running mean over the last epoch, with augmentation "
            "and noise. val: the validation split, single pass. acc gap = train acc − val acc, "
            "NLL gap = val NLL − train NLL.", ""]
    sigma = _sigma_table(runs, fitted, list(table["method"]))
    if sigma:
        out += ["## Learned noise σ_S/s per layer (last epoch)", "", sigma,
                "Geometric mean over channels per layer (metrics.csv sigma_rel_*).", ""]
    if figures:
        out += ["## Figures", ""] + [f"![{Path(f).stem}]({FIGURES}/{f})" for f in figures] + [""]
    return "\n".join(out)


def write_report(study: Study, root: str | Path) -> Written:
    """Write ``root``/report.md, report.csv (per method), runs.csv (per seed) and the figures."""
    from . import figures as figs

    root = Path(root)
    runs, curves, fitted = collect(study, root)
    order = _method_order(study, runs["method"])
    table = aggregate(runs, order)
    fig_dir = root / FIGURES
    drawn = []
    method_colors = figs.palette(_method_order(study, [m for m, r in study.runs.items()
                                                       if r["command"] != "measure"]))
    curve_order = _method_order(study, curves["method"]) if not curves.empty else []
    if not curves.empty:
        figs.nll_epochs(curves, curve_order, method_colors, fig_dir / FIG_EPOCHS)
        drawn.append(FIG_EPOCHS)
    baseline = study.report.baseline
    training = runs[~runs["command"].str.startswith("evaluate")]
    if training["fixed_noise"].any():
        figs.noise_scale(training, order, baseline, fig_dir / FIG_SCALE)
        drawn.append(FIG_SCALE)
    sigma_cols = [c for c in runs.columns if c.startswith("sigma_rel_")]
    if sigma_cols:
        figs.learned_profile(training, fitted, order, method_colors, fig_dir / FIG_PROFILE)
        drawn.append(FIG_PROFILE)
    markdown = _markdown(study, runs, table, fitted, drawn)
    files = [root / "report.md", root / "report.csv", root / "runs.csv"]
    atomic_write_text(files[0], markdown)
    atomic_write(files[1], lambda p: table.to_csv(p, index=False, float_format="%.6g"))
    atomic_write(files[2], lambda p: runs.to_csv(p, index=False, float_format="%.6g"))
    files += [fig_dir / f for f in drawn]
    return Written(markdown, files, runs, table)
