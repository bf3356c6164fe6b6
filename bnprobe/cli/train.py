"""``bnprobe train``: train a model and write a run directory."""

from __future__ import annotations

import click

from ._common import device_option, echo, out_option, quiet_option, seed_option


def data_options(f):
    """``--dataset``, ``--data-root``, ``--image-size``."""
    f = click.option("--image-size", type=int, default=None,
                     help="Resize image-folder images to this size.")(f)
    f = click.option("--data-root", default=None,
                     help="Dataset folder (default data/<dataset> or $BNPROBE_DATA/<dataset>).")(f)
    return click.option("--dataset", default="digits", show_default=True,
                        help="digits, cifar10, imagefolder or synthetic.")(f)


@click.command("train")
@data_options
@click.option("--arch", default="allcnn", show_default=True, help="allcnn or torchvision:<name>.")
@click.option("--width", type=float, default=1.0, show_default=True, help="All-CNN width multiplier.")
@click.option("--norm", default="bn", show_default=True, help="Normalization: none or bn.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--lr", type=float, default=0.05, show_default=True, help="Initial learning rate.")
@click.option("--lr-decay-epochs", type=float, default=600.0, show_default=True,
              help="Epochs over which the learning rate falls tenfold.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--optimizer", default="sgd", show_default=True, help="sgd (Nesterov) or adam.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--limit-train", type=int, default=None, help="Train on a random subset of N images.")
@click.option("--no-augment", is_flag=True, help="No random translation or flips.")
@seed_option
@device_option
@out_option("runs/train", "Run directory.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out.")
@quiet_option
def command(out: str, resume: bool, quiet: bool, no_augment: bool, **options) -> None:
    """Train a network and write RUN_DIR/{config.json, checkpoint.pt, metrics.csv}."""
    from ..training import TrainConfig, train

    config = TrainConfig(augment=not no_augment, **options)
    result = train(config, out, resume=resume, progress=not quiet, log=None if quiet else echo)
    last = result.history[-1] if result.history else {}
    echo(f"wrote {result.run_dir}/checkpoint.pt  (val acc {last.get('val_acc', float('nan')):.4f})")
