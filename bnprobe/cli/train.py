"""``bnprobe train``: train a model and write a run directory."""

from __future__ import annotations

from typing import Any, Callable

import click

from ..options import LR_SEARCH_STEPS, LR_SEARCH_TRIALS, NOISE_ADAM_LR, Augment, default_lr_help
from ._common import device_option, echo, out_option, quiet_option, seed_option


def data_options(f: Callable) -> Callable:
    """``--dataset``, ``--data-root``, ``--image-size``."""
    return _data_options("digits")(f)


def _data_options(dataset_default: str | None) -> Callable:
    def apply(f: Callable) -> Callable:
        f = click.option("--image-size", type=int, default=None,
                         help="Resize image-folder images to this size.")(f)
        f = click.option("--channels", type=click.IntRange(1, 3), default=None,
                         help="Convert the images to this many channels (1 <-> 3), e.g. 3 for a "
                              "torchvision model on grayscale data [default: as stored].")(f)
        f = click.option("--data-root", default=None,
                         help="Dataset folder (default data/<dataset> or $BNPROBE_DATA/<dataset>).")(f)
        return click.option("--dataset", default=dataset_default, show_default=True,
                            help="digits, cifar10, imagefolder or synthetic.")(f)
    return apply


def _noise_options(f: Callable) -> Callable:
    options = [
        click.option("--noise", "noise", default=None, metavar="FITTED_JSON",
                     help="Inject the noise of a fitted.json (bnprobe measure) after every "
                          "normalization; with --learn-noise it initializes sigma_S."),
        click.option("--noise-granularity", default="layer", show_default=True,
                     help="layer or channel: sigmas of the noise file to use."),
        click.option("--noise-scale", type=float, default=1.0, show_default=True,
                     help="Factor on the noise file's sigmas (fixed noise, or the start of learned noise)."),
        click.option("--learn-noise", default="off", show_default=True,
                     help="off, layer or channel: learn multiplicative noise S ~ N(s, sigma_S^2)."),
        click.option("--noise-init", type=float, default=None, metavar="SIGMA",
                     help="Learned noise starts at sigma_S/s = SIGMA in every channel "
                          "[default: the noise file's sigma_u times --noise-scale, else 0.05]."),
        click.option("--noise-optimizer", default="adam", show_default=True,
                     help="adam or sgd for the learned noise's u and s: a parameter group of their "
                          "own, without weight decay, whose rate --noise-lr falls with the lr "
                          "schedule by the same factor as the weights'."),
        click.option("--noise-lr", type=float, default=None,
                     help=f"Initial learning rate of the learned noise [default: {NOISE_ADAM_LR:g} with "
                          "adam, --lr with sgd]."),
        click.option("--prior-std", type=float, default=10.0, show_default=True,
                     help="Std of the N(1, std^2) prior of learned noise."),
        click.option("--kl-weight", type=float, default=1.0, show_default=True,
                     help="Weight of KL / train size in the loss of learned noise."),
        click.option("--mc-every", type=int, default=5, show_default=True,
                     help="Monte-Carlo validation loss every N epochs and after the last (0: never)."),
        click.option("--mc-samples", type=int, default=10, show_default=True,
                     help="Forward passes of the Monte-Carlo validation loss."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def train_options(dataset: str | None = "digits", arch: str | None = "allcnn",
                  width: float | None = 1.0, norm: str = "bn") -> Callable:
    """Every training option, with the defaults of a command (None: decided later)."""
    def apply(f: Callable) -> Callable:
        options = [
            _data_options(dataset),
            click.option("--arch", default=arch, show_default=True, help="allcnn or torchvision:<name>."),
            click.option("--width", type=float, default=width, show_default=True,
                         help="All-CNN width multiplier."),
            click.option("--norm", default=norm, show_default=True,
                         help="Normalization: none, bn, wn or an. A torchvision:<name> BN network is "
                              "converted by its graph: each conv->BN pair becomes one WN/AN layer, other "
                              "BNs a FixedNorm (wn) or ANNorm (an); LayerNorm/GroupNorm nets are refused."),
            click.option("--norm-batch", type=int, default=None,
                         help="bn: statistics over the batch plus K - batch-size other random samples."),
            click.option("--project/--no-project", default=None,
                         help="Keep scale-invariant weights at unit norm (no weight decay on them); "
                              "default: on for normalized nets."),
            click.option("--data-init/--no-data-init", default=True, show_default=True,
                         help="Data-dependent init of none and wn nets (one BN pass)."),
            click.option("--precise-bn/--no-precise-bn", default=True, show_default=True,
                         help="BN nets: before each validation (and in the saved checkpoint) set the BN "
                              "buffers to the sequential population statistics (bnprobe recalibrate)."),
            click.option("--precise-bn-size", type=click.IntRange(min=1), default=10000, show_default=True,
                         help="Training images (a seeded subset) for --precise-bn; about one extra "
                              "forward pass over them per epoch."),
            click.option("--sync-bn", is_flag=True,
                         help="Under torchrun: BN normalizes by the global batch of all processes "
                              "(SyncBN); without it each process normalizes its own --batch-size."),
            _noise_options,
            click.option("--epochs", type=int, default=10, show_default=True),
            click.option("--lr", default=None,
                         help="Initial learning rate, or 'auto' to search it. Default by "
                              f"normalization and optimizer: {default_lr_help()}."),
            click.option("--lr-search-steps", type=int, default=LR_SEARCH_STEPS, show_default=True,
                         help="Optimizer steps of each --lr auto trial run."),
            click.option("--lr-search-trials", type=int, default=LR_SEARCH_TRIALS, show_default=True,
                         help="Trial runs of --lr auto; the search costs trials x steps extra "
                              f"training steps ({LR_SEARCH_TRIALS} x {LR_SEARCH_STEPS} = "
                              f"{LR_SEARCH_TRIALS * LR_SEARCH_STEPS} by default: "
                              f"{LR_SEARCH_TRIALS * LR_SEARCH_STEPS * 32 / 45000:.1f} CIFAR-10 epochs "
                              "at batch 32) plus one evaluation per trial."),
            click.option("--lr-decay-epochs", type=float, default=None,
                         help="The learning rate falls tenfold every E epochs (lr * 0.1^(epoch/E)). "
                              "Default: --epochs minus 1, so the last epoch runs at lr/10; "
                              "--resume keeps the run's recorded value."),
            click.option("--batch-size", type=int, default=32, show_default=True,
                         help="Images per step and process (under torchrun the global batch is "
                              "this times the number of processes)."),
            click.option("--optimizer", default="sgd", show_default=True, help="sgd (Nesterov) or adam."),
            click.option("--weight-decay", type=float, default=0.0, show_default=True),
            click.option("--limit-train", type=int, default=None,
                         help="Train on a random subset of N images."),
            click.option("--augment", type=click.Choice([a.value for a in Augment]), default="auto",
                         show_default=True,
                         help="Training augmentation: random translations (up to 2 pixels) and/or "
                              "horizontal flips; auto: translations, plus flips where the data "
                              "declares them natural (CIFAR-10, RGB image folders; not digits or "
                              "grayscale folders, see data/README.md)."),
            click.option("--no-augment", is_flag=True, help="Same as --augment none."),
            seed_option,
            device_option,
        ]
        for option in reversed(options):
            f = option(f)
        return f
    return apply


def augment_settings(choice: str, no_augment: bool) -> dict[str, Any]:
    """TrainConfig fields of ``--augment`` (``--no-augment`` wins)."""
    return Augment.parse("none" if no_augment else choice, "augment").settings()


def report(result: Any) -> None:
    """Print where the run went and its last validation accuracy (process 0 of torchrun only)."""
    from ..distributed import world

    if not world().is_main:
        return
    last = result.history[-1] if result.history else {}
    extra = f", lr {result.config.lr:.4g} (searched)" if result.config and result.config.lr_auto else ""
    echo(f"wrote {result.run_dir}/checkpoint.pt  (val acc {last.get('val_acc', float('nan')):.4f}{extra})")


@click.command("train")
@train_options()
@out_option("runs/train", "Run directory.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out.")
@quiet_option
def command(out: str, resume: bool, quiet: bool, no_augment: bool, **options) -> None:
    """Train a network and write RUN_DIR/{config.json, checkpoint.pt, metrics.csv}."""
    from ..training import TrainConfig, train

    config = TrainConfig(**augment_settings(options.pop("augment"), no_augment), **options)
    result = train(config, out, resume=resume, progress=not quiet, log=None if quiet else echo)
    report(result)
