"""``bnprobe retrain``: train with a fitted.json's noise or with learned noise."""

from __future__ import annotations

import click

from ._common import echo, out_option, quiet_option
from .train import augment_settings, report, train_options


@click.command("retrain")
@train_options(dataset=None, arch=None, width=None, norm="wn")
@out_option("runs/retrain", "Run directory.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out.")
@quiet_option
def command(out: str, resume: bool, quiet: bool, no_augment: bool, noise: str | None,
            **options) -> None:
    """Retrain a BN network's architecture with wn/an plus its measured noise, or learned noise.

    Architecture, width and dataset default to those recorded in the noise file (written by
    'bnprobe measure'); every training option may override them. Without --noise, give
    --learn-noise layer|channel.
    """
    from ..retrain import retrain

    result = retrain(out, noise=noise, resume=resume, progress=not quiet,
                     log=None if quiet else echo,
                     **augment_settings(options.pop("augment"), no_augment), **options)
    report(result)
