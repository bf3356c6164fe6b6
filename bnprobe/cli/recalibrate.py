"""``bnprobe recalibrate``: a checkpoint whose BN buffers hold the population statistics."""

from __future__ import annotations

import click

from ._common import checkpoint_data_options, echo, quiet_option


@click.command("recalibrate")
@click.argument("checkpoint")
@click.option("--out", default=None,
              help="The new checkpoint [default: CHECKPOINT-precise.pt beside it, "
                   "RUN_DIR/checkpoint-precise.pt for a run].")
@click.option("--reference-size", type=click.IntRange(min=1), default=None,
              help="Training images to use (a seeded subset) [default: all].")
@checkpoint_data_options
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@quiet_option
def command(quiet: bool, **options) -> None:
    """Write CHECKPOINT (a file or RUN_DIR) with BN buffers set to the population statistics.

    PreciseBN done layer by layer: each BN layer's buffers become the mean and variance of its
    input over the training data, with every upstream BN already normalizing by its own
    population statistics. Running buffers lag the weights; these do not.
    """
    from ..measure.pipeline import recalibrate_checkpoint

    path = recalibrate_checkpoint(progress=not quiet, log=None if quiet else echo, **options)
    echo(f"wrote {path}")
