"""``bnprobe fit``: noise levels at one batch size from a measurement folder."""

from __future__ import annotations

import click

from ..layout import FITTED, MEASUREMENTS_DIR
from ._common import echo


@click.command("fit")
@click.argument("measurements", default=MEASUREMENTS_DIR, type=click.Path(file_okay=False))
@click.option("--batch-size", type=int, default=32, show_default=True,
              help="Batch size to export; an unmeasured one is predicted from n_eff (variance ~ 1/k).")
@click.option("--out", default=FITTED, show_default=True, help="Noise file to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def command(measurements: str, batch_size: int, out: str, force: bool) -> None:
    """Write the noise file (format bnprobe.noise v1) consumed by `bnprobe retrain --noise`."""
    from ..io import refuse_overwrite
    from ..measure import Measurements, fit_noise, noise_flags

    if not force:
        refuse_overwrite(out, "pass --force to overwrite")
    spec = fit_noise(Measurements.load(measurements), batch_size)
    spec.save(out)
    for layer in spec.layers:
        echo(f"{layer['index']:3d} {layer['name']:30s} sigma_v {layer['sigma_v']:.4f}  "
             f"sigma_u {layer['sigma_u']:.4f}  n_eff {layer['n_eff']:.1f}")
    echo(f"wrote {out} (batch size {batch_size})")
    for line in noise_flags(spec):
        click.echo(f"Warning: {line}", err=True)
