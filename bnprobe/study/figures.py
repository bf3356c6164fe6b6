"""The study's figures, drawn with seaborn from the tidy frames of the report module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

#: Line style of a reference (not fixed-noise) method in the noise-scale figure, by kind.
REFERENCE_STYLE = {"bn": "--", "learned": "-.", "plain": ":"}
#: Colors by normalization in the noise-scale figure (a norm's curve and its references share one).
NORM_COLORS = {"bn": ["black", "0.55", "0.3"], "wn": ["tab:blue"], "an": ["tab:orange"],
               "none": ["tab:green"]}


def palette(methods: list[str]) -> dict[str, Any]:
    """One color per method, the same in every figure."""
    import seaborn as sns

    colors = sns.color_palette("tab10" if len(methods) <= 10 else "tab20", len(methods))
    return dict(zip(methods, colors))


def _save(fig: Any, out: Path) -> None:
    from ..io import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: fig.savefig(p, dpi=130, bbox_inches="tight", format="png"))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def nll_epochs(curves: pd.DataFrame, order: list[str], colors: dict[str, Any], out: Path) -> None:
    """NLL against epoch per method: training subset (evaluation mode) and validation.

    Lines are the mean over seeds, bands one standard deviation.
    """
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    labels = curves.drop_duplicates("method").set_index("method")["label"]
    data = curves.assign(method=curves["method"].map(labels))
    hue_order = [labels[m] for m in order]
    pal = {labels[m]: colors[m] for m in order}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, split in zip(axes, ["train (eval mode)", "validation"]):
        part = data[data["split"] == split]
        sns.lineplot(part, x="epoch", y="nll", hue="method", hue_order=hue_order, palette=pal,
                     errorbar="sd", ax=ax, legend=ax is axes[-1], linewidth=1.4)
        ax.set_title(f"{split} NLL (mean ± sd over seeds)")
        ax.set_ylabel("NLL (nats)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, title="method")
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)


def _kind(row: pd.Series) -> str:
    if row["learn_noise"] != "off":
        return "learned"
    return "bn" if row["norm"] == "bn" else "plain"


def noise_scale(runs: pd.DataFrame, order: list[str], baseline: str | None, out: Path) -> None:
    """Validation NLL at the last epoch against the injected noise scale, one line per norm.

    Runs with fixed noise form the curves (mean ± sd over seeds, log2 axis), colored by
    normalization; every other training method is a horizontal line at its mean in its norm's
    color (dashed: BN; dotted: no noise; dash-dot: learned noise), the ``baseline`` thicker.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    used: dict[str, int] = {}

    def color(norm: str) -> Any:
        options = NORM_COLORS.get(norm, ["tab:purple"])
        used[norm] = used.get(norm, -1) + 1
        return options[min(used[norm], len(options) - 1)]

    fixed = runs[runs["fixed_noise"]]
    norm_color: dict[str, Any] = {}
    for norm, part in fixed.groupby("norm", sort=False):
        norm_color[norm] = c = color(norm)
        stats = part.groupby("noise_scale")["val_loss"].agg(["mean", "std"]).reset_index()
        ax.errorbar(stats["noise_scale"], stats["mean"], yerr=stats["std"].fillna(0), marker="o",
                    capsize=3, color=c, linewidth=1.8, label=f"{norm} + fixed noise, single pass")
        if part["val_loss_mc"].notna().any():
            mc = part.groupby("noise_scale")["val_loss_mc"].mean()
            ax.plot(mc.index, mc.values, marker="x", linestyle="--", color=c, alpha=0.6,
                    label=f"{norm} + fixed noise, MC (last epoch)")
    for method in order:
        part = runs[runs["method"] == method]
        if part.empty or part["fixed_noise"].any():
            continue
        row = part.iloc[0]
        kind = _kind(row)
        c = norm_color[row["norm"]] if kind != "bn" and row["norm"] in norm_color else color(row["norm"])
        ax.axhline(part["val_loss"].mean(), color=c, linestyle=REFERENCE_STYLE[kind],
                   linewidth=2.4 if method == baseline else 1.3, label=row["label"])
    ax.set_xscale("log", base=2)
    scales = sorted(set(fixed["noise_scale"]))
    ax.set_xticks(scales)
    ax.set_xticklabels([f"{s:g}" for s in scales])
    ax.set_xlabel("injected noise scale (× BN's fitted σ)")
    ax.set_ylabel("validation NLL, last epoch (nats)")
    ax.set_title("Regularization by injected BN noise (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    curves_first = sorted(range(len(labels)), key=lambda i: "fixed noise" not in labels[i])
    ax.legend([handles[i] for i in curves_first], [labels[i] for i in curves_first],
              loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)


def learned_profile(runs: pd.DataFrame, fitted: pd.DataFrame, order: list[str], colors: dict[str, Any],
                    out: Path) -> None:
    """Learned sigma_S/s per layer at the last epoch (mean ± sd over seeds), with BN's measured sigma_u."""
    import seaborn as sns
    from matplotlib.ticker import FuncFormatter

    plt = _pyplot()
    cols = [c for c in runs.columns if c.startswith("sigma_rel_")]
    learned = runs[runs[cols].notna().any(axis=1)]
    tidy = learned.melt(id_vars=["method", "label", "seed"], value_vars=cols, var_name="layer",
                        value_name="sigma").dropna(subset=["sigma"])
    tidy["layer"] = tidy["layer"].str.rsplit("_", n=1).str[1].astype(int)
    methods = [m for m in order if m in set(tidy["method"])]
    labels = learned.drop_duplicates("method").set_index("method")["label"]
    tidy["method"] = tidy["method"].map(labels)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    sns.lineplot(tidy, x="layer", y="sigma", hue="method", hue_order=[labels[m] for m in methods],
                 palette={labels[m]: colors[m] for m in methods}, errorbar="sd", marker="o", ax=ax)
    if not fitted.empty:
        for _method, part in fitted.groupby("method", sort=False):
            sigma = part.groupby("layer")["sigma_u"].mean()
            k = int(part["batch_size"].iloc[0])
            ax.plot(sigma.index, sigma.values, color="black", linestyle="--", marker="s", markersize=4,
                    label=f"{part['label'].iloc[0]}: BN's measured σ_U (k = {k})")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.set_xticks(sorted(set(tidy["layer"])))
    ax.set_xlabel("layer")
    ax.set_ylabel("σ_S / s (geometric mean over channels)")
    ax.set_title("Learned noise per layer, last epoch (mean ± sd over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
