"""``bnprobe plot``: figures of BN randomness and learning curves (PNG, optionally PDF)."""

from __future__ import annotations

from typing import Any, Callable

import click

from ..layout import FITTED, MEASUREMENTS_DIR
from ._common import echo

_OVERWRITE = "Figure file to write (overwritten if it exists)."


def _figure_options(default_out: str) -> Callable:
    """``--out`` and ``--pdf``, shared by every subcommand."""
    def wrap(f: Callable) -> Callable:
        f = click.option("--pdf", is_flag=True, help="Also write a PDF next to --out (same name, .pdf).")(f)
        return click.option("--out", default=default_out, show_default=True, help=_OVERWRITE)(f)
    return wrap


def _report(out: str, pdf: bool) -> None:
    from ..plots import figure_paths

    for path in figure_paths(out, pdf):
        echo(f"wrote {path}")


def _measurements_argument(f: Callable) -> Callable:
    return click.argument("measurements", default=MEASUREMENTS_DIR, type=click.Path(file_okay=False))(f)


@click.group("plot")
def command() -> None:
    """Draw figures from measurements, noise files and training runs.

    Figures are written as PNG (150 dpi), plus a PDF with --pdf; an existing figure at the
    same path is overwritten.
    """


@command.command("chi2")
@_measurements_argument
@click.option("--layer", default=None, help="Layer name or index (default: one panel per layer).")
@click.option("--batch-size", type=int, default=None,
              help="Batch size k to show (default 32 if measured, else the middle measured size).")
@_figure_options("figures/chi2.png")
def chi2(measurements: str, layer: Any, batch_size: int | None, out: str, pdf: bool) -> None:
    """Histogram of n S^2/sigma^2 against the nominal and fitted chi-square densities."""
    from ..plots import plot_chi2

    plot_chi2(measurements, layer=layer, batch_size=batch_size, out=out, pdf=pdf)
    _report(out, pdf)


@command.command("batch-scaling")
@_measurements_argument
@_figure_options("figures/batch_scaling.png")
def batch_scaling(measurements: str, out: str, pdf: bool) -> None:
    """Var(V) and Var(U) against batch size, log-log, one line per layer."""
    from ..plots import plot_batch_scaling

    plot_batch_scaling(measurements, out=out, pdf=pdf)
    _report(out, pdf)


@command.command("spatial-scaling")
@_measurements_argument
@_figure_options("figures/spatial_scaling.png")
def spatial_scaling(measurements: str, out: str, pdf: bool) -> None:
    """Var(V) and Var(U) times k against the layers' spatial sizes (and within layers)."""
    from ..plots import plot_spatial_scaling

    plot_spatial_scaling(measurements, out=out, pdf=pdf)
    _report(out, pdf)


@command.command("noise")
@click.argument("sources", nargs=-1, type=click.Path())
@click.option("--label", "labels", multiple=True,
              help="Legend label per run, repeatable, in RUN_DIR order (default: folder name and norm).")
@_figure_options("figures/noise.png")
def noise(sources: tuple[str, ...], labels: tuple[str, ...], out: str, pdf: bool) -> None:
    """Fitted BN noise per layer, or learned noise over the epochs of training runs.

    With one SOURCE that is a noise file (bnprobe fit) or a measurement folder (default
    measurements/fitted.json): sigma_V and sigma_U per layer with their spread over channels,
    from its fitted.json or, when it has none, fitted from its samples at batch size 32 (or
    the middle measured size).

    With one or more run folders (folders with a metrics.csv, trained with --learn-noise):
    the learned sigma_S/s of every layer over the epochs, and its profile over the layers
    after the last epoch; several runs (e.g. two starts of the same noise) are overlaid.
    """
    from ..errors import BnprobeError
    from ..plots import plot_noise, plot_noise_trajectory
    from ..plots.noise import is_run_dir

    sources = sources or (f"{MEASUREMENTS_DIR}/{FITTED}",)
    runs = [is_run_dir(s) for s in sources]
    if all(runs):
        plot_noise_trajectory(list(sources), labels=list(labels) or None, out=out, pdf=pdf)
    elif any(runs) or len(sources) > 1:
        raise BnprobeError("give one noise file or measurement folder, or one or more run folders "
                           "(with a metrics.csv), not a mix")
    else:
        if labels:
            raise BnprobeError("--label names runs: give run folders")
        plot_noise(sources[0], out=out, pdf=pdf)
    _report(out, pdf)


@command.command("curves")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--metric", "metrics", multiple=True,
              help="metrics.csv column to plot, repeatable "
                   "[default: train_loss, train_eval_loss, val_loss].")
@click.option("--label", "labels", multiple=True,
              help="Legend label per run, repeatable, in RUN_DIR order (default: folder name and norm).")
@_figure_options("figures/curves.png")
def curves(run_dirs: tuple[str, ...], metrics: tuple[str, ...], labels: tuple[str, ...], out: str,
           pdf: bool) -> None:
    """Per-epoch curves of the runs in RUN_DIR... overlaid, one panel per metric.

    The defaults compare the training loss in training mode with the training loss in
    evaluation mode and the validation loss.
    """
    from ..plots import plot_curves
    from ..plots.curves import DEFAULT_METRICS

    plot_curves(list(run_dirs), metrics=list(metrics) or DEFAULT_METRICS, labels=list(labels) or None,
                out=out, pdf=pdf)
    _report(out, pdf)


@command.command("coverage")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--method", default="single", show_default=True, help="single or mcN (e.g. mc10).")
@_figure_options("figures/coverage.png")
def coverage(runs: tuple[str, ...], method: str, out: str, pdf: bool) -> None:
    """Error-coverage curves (selective prediction) of evaluated RUN_DIRs."""
    from ..plots.evaluation import plot_coverage

    plot_coverage(list(runs), method=method, out=out, pdf=pdf)
    _report(out, pdf)


@command.command("robustness")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@_figure_options("figures/robustness.png")
def robustness(runs: tuple[str, ...], out: str, pdf: bool) -> None:
    """Accuracy under Gaussian input noise and FGSM of RUN_DIRs evaluated with --robustness."""
    from ..plots.evaluation import plot_robustness

    plot_robustness(list(runs), out=out, pdf=pdf)
    _report(out, pdf)
