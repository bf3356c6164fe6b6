"""``bnprobe fit``: noise levels at one batch size, or of a multi-GPU set-up, from a measurement folder."""

from __future__ import annotations

import click

from ..errors import BnprobeError
from ..layout import FITTED, MEASUREMENTS_DIR
from ._common import echo

DEFAULT_BATCH_SIZE = 32


@click.command("fit")
@click.argument("measurements", default=MEASUREMENTS_DIR, type=click.Path(file_okay=False))
@click.option("--batch-size", type=int, default=None,
              help=f"Batch size to export [default: {DEFAULT_BATCH_SIZE}]; an unmeasured one is predicted "
                   "from n_eff (variance ~ 1/k).")
@click.option("--per-device-batch", type=click.IntRange(min=2), default=None, metavar="K",
              help="Instead of --batch-size: a multi-GPU set-up of --world-size processes with K "
                   "images each per step; prints each layer's noise with and without SyncBN.")
@click.option("--world-size", type=click.IntRange(min=1), default=None, metavar="W",
              help="Processes (devices) of the --per-device-batch set-up.")
@click.option("--sync-bn", is_flag=True,
              help="The set-up uses SyncBN (statistics over the global batch K x W); without it "
                   "each device normalizes its own K images.")
@click.option("--out", default=FITTED, show_default=True, help="Noise file to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def command(measurements: str, batch_size: int | None, per_device_batch: int | None,
            world_size: int | None, sync_bn: bool, out: str, force: bool) -> None:
    """Write the noise file (format bnprobe.noise v1) consumed by `bnprobe retrain --noise`.

    With --per-device-batch K --world-size W [--sync-bn] the file holds the noise that each BN
    layer sees when training on W devices with K images each: that of K without SyncBN, of
    K x W with it.
    """
    from ..io import refuse_overwrite
    from ..measure import Measurements, fit_device_noise, fit_noise, noise_flags

    _check_options(batch_size, per_device_batch, world_size, sync_bn)
    if not force:
        refuse_overwrite(out, "pass --force to overwrite")
    m = Measurements.load(measurements)
    if per_device_batch is None:
        batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
        spec = fit_noise(m, batch_size)
        for layer in spec.layers:
            echo(f"{layer['index']:3d} {layer['name']:30s} sigma_v {layer['sigma_v']:.4f}  "
                 f"sigma_u {layer['sigma_u']:.4f}  n_eff {layer['n_eff']:.1f}")
        what = f"batch size {batch_size}"
    else:
        spec, table = fit_device_noise(m, per_device_batch, world_size, sync_bn)
        _print_device_table(table, per_device_batch, world_size, m.batch_sizes)
        what = (f"{world_size} x {per_device_batch}, " + (f"SyncBN: batch size {spec.batch_size}" if sync_bn
                else f"no SyncBN: batch size {spec.batch_size} per device"))
    spec.save(out)
    echo(f"wrote {out} ({what})")
    for line in noise_flags(spec):
        click.echo(f"Warning: {line}", err=True)


def _check_options(batch_size: int | None, per_device_batch: int | None, world_size: int | None,
                   sync_bn: bool) -> None:
    if per_device_batch is not None and batch_size is not None:
        raise BnprobeError("--batch-size and --per-device-batch exclude each other: --batch-size K is "
                           "one process's batch, --per-device-batch K --world-size W a multi-GPU set-up")
    if per_device_batch is None and (world_size is not None or sync_bn):
        flag = "--world-size" if world_size is not None else "--sync-bn"
        raise BnprobeError(f"{flag} describes a multi-GPU set-up: give it with --per-device-batch K")
    if per_device_batch is not None and world_size is None:
        raise BnprobeError("--per-device-batch needs --world-size W (the number of processes)")


def _print_device_table(table, k: int, world_size: int, measured: list[int]) -> None:
    """Each layer's sigmas without SyncBN (batch k) and with it (batch k x world size)."""
    g = k * world_size
    echo(f"BN noise with {world_size} processes x batch {k} (global batch {g}): without SyncBN each "
         f"layer normalizes by its process's {k} images, with SyncBN by all {g}")
    echo(f"{'':34s} {'no SyncBN (k=' + str(k) + ')':>18s}  {'SyncBN (k=' + str(g) + ')':>18s}")
    echo(f"{'':34s} {'sigma_v':>8s} {'sigma_u':>9s}  {'sigma_v':>8s} {'sigma_u':>9s}")
    for row in table.itertuples(index=False):
        echo(f"{row.index:3d} {row.layer:30s} {row.sigma_v_device:8.4f} {row.sigma_u_device:9.4f}  "
             f"{row.sigma_v_sync:8.4f} {row.sigma_u_sync:9.4f}")
    unmeasured = [b for b in (k, g) if b not in measured]
    if unmeasured:
        echo(f"(batch size {', '.join(map(str, unmeasured))} not measured (measured: "
             f"{', '.join(map(str, measured))}): predicted from the nearest measured one, variance ~ 1/k)")
