"""``bnprobe measure``: sample BN noise of a checkpoint and fit the noise model."""

from __future__ import annotations

import click

from ..layout import FITTED, LAYERS, MEASUREMENTS_DIR, REFERENCE, SAMPLES, SUMMARY
from ._common import CommaList, checkpoint_data_options, echo, quiet_option


@click.command("measure")
@click.argument("checkpoint")
@click.option("--batch-sizes", type=CommaList(int, minimum=2), default="8,32,128", show_default=True,
              help="Batch sizes k, comma-separated.")
@click.option("--samples", type=click.IntRange(min=2), default=200, show_default=True,
              help="Random batches per batch size.")
@click.option("--mode", type=click.Choice(["joint", "isolated"]), default="joint", show_default=True,
              help="joint: every BN in training mode, as in learning (V, U carry upstream noise); "
                   "isolated: every other BN normalizes by the reference (pure per-layer noise).")
@click.option("--reference", type=click.Choice(["population", "running"]), default="population",
              show_default=True,
              help="population: each layer's input over the training data with every upstream BN "
                   "normalizing by its own population statistics (exact, float64, ~1 forward pass); "
                   "running: the BN buffers.")
@click.option("--reference-size", type=click.IntRange(min=1), default=None,
              help="Training images for the reference (a seeded subset) [default: all].")
@click.option("--augment-draws", type=click.IntRange(min=1), default=1, show_default=True,
              help="Augmented copies of each image in the reference (and isolated draws).")
@click.option("--isolated-method", type=click.Choice(["sufficient", "forward"]), default="sufficient",
              show_default=True,
              help="isolated mode: draw batches from per-image sums (no forward passes) "
                   "or by forward passes.")
@click.option("--spatial-fractions", type=CommaList(float), default=None,
              help="Also use random subsets of these fractions of spatial positions, e.g. 0.25,0.5,1.")
@click.option("--spatial-sampling", type=click.Choice(["independent", "shared"]), default="independent",
              show_default=True,
              help="Random positions drawn per image (i.i.d., the n = k z model) or shared by the batch.")
@click.option("--layers", default=None, help="Glob(s) of BN layer names, comma-separated (default all).")
@checkpoint_data_options
@click.option("--out", default=MEASUREMENTS_DIR, show_default=True, help="Output folder.")
@click.option("--force", is_flag=True,
              help="Replace measurements already in --out, and write fitted.json even from a "
                   "measurement flagged as broken.")
@click.option("--resume", is_flag=True, help="Continue the interrupted measurement in --out.")
@quiet_option
def command(quiet: bool, **options) -> None:
    """Measure V and U of every BN layer of CHECKPOINT (a file or RUN_DIR); write the measurement folder.

    V = (mu - M) / sqrt(sigma^2 + eps) and U = sqrt(sigma^2 + eps) / sqrt(S^2 + eps), with M, S^2 a
    batch's mean and variance of the layer's input, mu, sigma^2 the reference, eps the BN's own.

    Under torchrun (torchrun --nproc-per-node N -m bnprobe measure ...) the processes share the
    draws of each batch size; process 0 writes the folder.
    """
    import pandas as pd

    from ..measure.pipeline import layer_table, measure_checkpoint

    m, summary = measure_checkpoint(progress=not quiet, log=None if quiet else echo,
                                    warn=lambda line: click.echo(f"Warning: {line}", err=True), **options)
    if summary is None:  # not process 0 of torchrun: it reports
        return
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_rows", 500,
                           "display.float_format", "{:.4g}".format):
        echo(layer_table(summary).to_string(index=False))
    out = options["out"]
    echo(f"wrote {out}/{SAMPLES}, {LAYERS}, {REFERENCE}, {SUMMARY}, {FITTED}")
