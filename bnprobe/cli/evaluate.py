"""``bnprobe evaluate``: accuracy, NLL, MC prediction, calibration, selective prediction."""

from __future__ import annotations

import click

from ..layout import COVERAGE, EVALUATION, ROBUSTNESS
from ._common import CommaList, device_option, echo, quiet_option, seed_option, unsafe_load_option


@click.command("evaluate")
@click.argument("target", type=click.Path())
@click.option("--split", default="test", show_default=True, help="test or val.")
@click.option(
    "--mc",
    type=CommaList(int, minimum=1),
    default="10,30",
    show_default=True,
    help="Monte-Carlo sample counts.",
)
@click.option("--robustness", is_flag=True, help="Accuracy under Gaussian input noise and FGSM.")
@click.option(
    "--noise",
    default=None,
    type=click.Path(dir_okay=False),
    help="fitted.json: MC prediction of a BN network by parametric stochastic BN.",
)
@click.option("--dataset", default=None, help="Expected dataset (refuses a checkpoint of another).")
@click.option("--out", default=None, help="Output folder (default RUN_DIR/evaluation).")
@click.option("--force", is_flag=True, help="Replace an existing evaluation in --out.")
@unsafe_load_option
@seed_option
@device_option
@quiet_option
def command(quiet: bool, **options) -> None:
    """Evaluate RUN_DIR or CHECKPOINT; write metrics.json, coverage.csv and robustness.csv.

    Under torchrun (torchrun --nproc-per-node N -m bnprobe evaluate ...) the processes share the
    evaluation images; process 0 writes.
    """
    from ..distributed import world
    from ..evaluation.run import evaluate_checkpoint

    doc = evaluate_checkpoint(progress=not quiet, log=echo, **options)
    if not world().is_main:  # another process of torchrun: process 0 reports
        return
    echo(f"{doc['label']} on {doc['config']['split']} ({doc['config']['n']} images)")
    echo(f"{'':8s} {'accuracy':>9s} {'nll':>8s} {'ece':>8s} {'ece_ad':>8s} {'brier':>8s} {'aurc':>8s}")
    for name, m in doc["metrics"].items():
        if isinstance(m, dict):
            echo(
                f"{name:8s} {m['accuracy']:9.4f} {m['nll']:8.4f} {m['ece']:8.4f} "
                f"{m['ece_adaptive']:8.4f} {m['brier']:8.4f} {m['aurc_entropy']:8.5f}"
            )
    echo(
        f"wrote {doc['out']}/{EVALUATION}, {COVERAGE}"
        + (f", {ROBUSTNESS}" if options["robustness"] else "")
    )
