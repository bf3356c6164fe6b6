"""``bnprobe measure``: sample BN noise of a checkpoint and fit the noise model."""

from __future__ import annotations

import click

from ._common import CommaList, device_option, echo, quiet_option, seed_option, unsafe_load_option


@click.command("measure")
@click.argument("checkpoint")
@click.option("--batch-sizes", type=CommaList(int, minimum=2), default="8,32,128", show_default=True,
              help="Batch sizes k, comma-separated.")
@click.option("--samples", type=click.IntRange(min=2), default=200, show_default=True,
              help="Random batches per batch size.")
@click.option("--mode", default="joint", show_default=True,
              help="joint (all BN in training mode) or isolated (upstream BN deterministic).")
@click.option("--reference", default="population", show_default=True,
              help="population (exact statistics over the data) or running (the BN buffers).")
@click.option("--spatial-fractions", type=CommaList(float), default=None,
              help="Also use random subsets of these fractions of spatial positions, e.g. 0.25,0.5,1.")
@click.option("--layers", default=None, help="Glob(s) of BN layer names, comma-separated (default all).")
@click.option("--dataset", default=None, help="Override the checkpoint's dataset.")
@click.option("--data-root", default=None, help="Override the dataset folder.")
@click.option("--arch", default=None, help="Architecture of a plain state_dict, e.g. torchvision:resnet18.")
@click.option("--num-classes", type=int, default=None, help="Classes of a plain state_dict.")
@unsafe_load_option
@seed_option
@device_option
@click.option("--out", default="measurements", show_default=True, help="Output folder.")
@click.option("--force", is_flag=True, help="Replace measurements already in --out.")
@click.option("--resume", is_flag=True, help="Continue the interrupted measurement in --out.")
@quiet_option
def command(quiet: bool, **options) -> None:
    """Measure V and U of every BN layer of CHECKPOINT (a file or RUN_DIR); write the measurement folder."""
    import pandas as pd

    from ..measure.pipeline import layer_table, measure_checkpoint

    _, summary = measure_checkpoint(progress=not quiet, log=None if quiet else echo, **options)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_rows", 500,
                           "display.float_format", "{:.4g}".format):
        echo(layer_table(summary).to_string(index=False))
    out = options["out"]
    echo(f"wrote {out}/samples.parquet, layers.csv, reference.parquet, summary.csv, fitted.json")
