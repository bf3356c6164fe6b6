"""``bnprobe quickstart``: the whole pipeline on the bundled digits data."""

from __future__ import annotations

import click

from ._common import device_option, echo, out_option, quiet_option, seed_option


@click.command("quickstart")
@out_option("bnprobe-quickstart", "Output folder.")
@seed_option
@device_option
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Training epochs of each run [default: 20]; fewer for a quick look at the pipeline.")
@quiet_option
def command(out: str, seed: int, device: str, epochs: int | None, quiet: bool) -> None:
    """Run every stage of bnprobe on scikit-learn's digits (a few minutes on a laptop CPU)."""
    from ..quickstart import run_quickstart

    result = run_quickstart(out, device=device, seed=seed, progress=not quiet,
                            log=None if quiet else echo, epochs=epochs)
    echo("")
    echo(result.report)
    echo("Results:")
    for name, path in result.files.items():
        echo(f"  {name}: {path}")
