"""``train``: the training loop behind ``bnprobe train``, resumable and reproducible."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import distributed
from .._version import __version__
from ..checkpoint import open_checkpoint, save_checkpoint
from ..data import DataSpec, ImageData, load_dataset, make_splits
from ..errors import BnprobeError
from ..io import atomic_write_json
from ..layers import BN_TYPES
from ..layout import CHECKPOINT, CONFIG, METRICS
from ..measure import recalibrate
from ..models import build_model
from ..noise.network import (
    kl_total,
    learned_noise_parameters,
    noise_modules,
    relative_sigmas,
    set_noise_generator,
)
from ..norms.syncbn import convert_sync_batchnorm
from .config import TrainConfig, lr_at, lr_factor
from .evaluate import loss_and_accuracy, mc_loss_and_accuracy
from .lr_auto import search_learning_rate
from .run_files import write_metrics_csv
from .setup import initialize_model, make_optimizer, noise_lr, run_arch_kwargs, step_hooks
from .steps import RunGenerators, train_epoch, training_batches

__all__ = ["TrainResult", "train", "train_epoch"]

EVAL_SUBSET_SEED = 0
MC_SEED_OFFSET = 6
PRECISE_SEED_OFFSET = 7
#: Options resolved when a run starts; a resumed run keeps its recorded value unless given.
INHERITED_ON_RESUME = ("lr_decay_epochs", "noise_lr")


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        run_dir: The run directory.
        model: The trained model (in evaluation mode).
        history: One dict of metrics per epoch.
        config: The options.
    """

    run_dir: Path
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    config: TrainConfig | None = None


def _check_resume(config: TrainConfig, previous: Any, ckpt_path: Path) -> None:
    if previous.payload is None:
        raise BnprobeError(f"{ckpt_path} is not a bnprobe training checkpoint")
    old = TrainConfig.from_dict(previous.config)
    if old.project is None:
        old.project = old.norm != "none"
    if (config.lr_is_auto and old.lr_auto) or config.lr is None:
        config.lr, config.lr_auto = old.lr, old.lr_auto
    for name in INHERITED_ON_RESUME:  # not given: the run's own (recorded) value
        if getattr(config, name) is None:
            setattr(config, name, getattr(old, name))
    diff = old.differences(config)
    if diff:
        raise BnprobeError(f"cannot resume with changed options: {', '.join(diff)}")


def _check_world(payload: dict[str, Any], world: distributed.World, ckpt_path: Path) -> None:
    """A run resumes with the number of processes it was started with."""
    before = int(payload.get("world_size", 1))
    if before != world.size:
        how = "one process" if before == 1 else f"torchrun --nproc-per-node {before} (or the same total)"
        raise BnprobeError(f"cannot resume {ckpt_path}: it was trained by {before} process(es), this run "
                           f"has {world.size}; resume with {how}")


def _reduced_epoch_loss(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[float, float]:
    """Training loss and accuracy of an epoch, summed over the processes of the run."""
    total = distributed.all_reduce_sum(torch.stack([loss_sum.double(), correct.double(),
                                                    torch.tensor(float(seen), dtype=torch.float64,
                                                                 device=loss_sum.device)]))
    return total[0].item() / total[2].item(), total[1].item() / total[2].item()


def _load_optimizer_state(optimizer: Any, state: Any, ckpt_path: Path) -> None:
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as exc:
        raise BnprobeError(f"cannot resume {ckpt_path}: its optimizer state does not fit this run's "
                           f"parameter groups ({exc}); it was probably written by another bnprobe "
                           "version") from None


def _epoch_noise_metrics(model: nn.Module, train_size: int, kl_weight: float) -> dict[str, float]:
    ratios = relative_sigmas(model)
    if not ratios:
        return {}
    with torch.no_grad():
        kl = float(kl_total(model))
    row = {"kl": kl * kl_weight / train_size, "sigma_rel_mean": sum(ratios) / len(ratios)}
    row.update({f"sigma_rel_{i + 1}": r for i, r in enumerate(ratios)})
    return row


def _precise_bn(model: nn.Module, config: TrainConfig, splits: Any, device: torch.device) -> dict | None:
    """With ``config.precise_bn``, set the BN buffers to the population statistics (None: no BN)."""
    if not config.precise_bn or not any(
            isinstance(m, BN_TYPES) and m.running_mean is not None for m in model.modules()):
        return None
    gen = torch.Generator().manual_seed(config.seed + PRECISE_SEED_OFFSET)
    return recalibrate(model, splits.train, size=config.precise_bn_size, augment=config.augment,
                       generator=gen, device=device, shard=True)


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """The model wrapped in DistributedDataParallel (parameters and buffers from process 0)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _diverged_message(loss: float, epoch: int, lr: float, run_dir: Path) -> str:
    """What a divergent epoch leaves behind: the checkpoint of the previous epoch, or none."""
    if epoch > 0:
        kept = f"{run_dir / CHECKPOINT} (after epoch {epoch}) is kept"
    else:
        kept = f"no checkpoint was written ({run_dir} holds only {CONFIG})"
    return f"training loss became {loss} in epoch {epoch + 1} at lr {lr:.4g}; {kept}. Try a smaller --lr"


def train(
    config: TrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    data: ImageData | None = None,
) -> TrainResult:
    """Train a model and write RUN_DIR/{config.json, checkpoint.pt, metrics.csv}.

    The checkpoint and metrics are written atomically after every epoch. With ``resume``, an
    interrupted run continues from its last checkpoint and ends with the same weights as an
    uninterrupted run.

    Under torchrun (``WORLD_SIZE`` > 1) the model trains with DistributedDataParallel, one
    process per device: ``batch_size`` is per process, each process takes its shard of every
    global batch, ``sync_bn`` makes BN use the global batch, noise is drawn independently per
    process, the epoch metrics are summed over processes and only process 0 writes files.

    A fresh run first initializes from the data (AN input moments,
    projection, data-dependent init; see :func:`bnprobe.training.setup.initialize_model`) and,
    with ``lr="auto"``, searches the learning rate from that initialization.

    Args:
        config: Training options.
        out: The run directory.
        resume: Continue the run in ``out``.
        progress: Show progress bars.
        log: Called with one line per epoch.
        data: The dataset, if already loaded (otherwise loaded from ``config``).

    Returns:
        The result, with the trained model.
    """
    config.validate()
    run_dir = Path(out)
    ckpt_path = run_dir / CHECKPOINT
    world, device = distributed.setup(config.device)
    log = log if (log is not None and world.is_main) else (lambda _msg: None)
    progress = progress and world.is_main
    previous = None
    if resume:
        previous = open_checkpoint(ckpt_path, device=device)
        _check_resume(config, previous, ckpt_path)
        _check_world(previous.payload, world, ckpt_path)
    elif ckpt_path.exists():
        raise BnprobeError(f"{run_dir} already holds a run; use --resume or another --out")

    if data is None:
        data = load_dataset(config.dataset, config.data_root, image_size=config.image_size)
    data = data.with_channels(config.channels)
    spec = DataSpec.from_data(data, translate=config.translate if config.augment else 0,
                              flip=config.flip if config.augment else False)
    subset_gen = torch.Generator().manual_seed(config.seed + 2)
    splits = make_splits(data, spec, device, config.limit_train, subset_gen)
    n_train = len(splits.train)
    if n_train < max(config.batch_size * world.size, config.norm_batch or 0):
        raise BnprobeError(
            f"the training set has {n_train} images, fewer than --batch-size {config.batch_size}"
            + (f" times {world.size} processes" if world.distributed else "")
            + (f" or --norm-batch {config.norm_batch}" if config.norm_batch else "")
        )
    arch_kwargs = previous.arch_kwargs if previous is not None else run_arch_kwargs(config, spec)
    model = build_model(config.arch, arch_kwargs, seed=config.seed).to(device)
    if config.sync_bn:
        convert_sync_batchnorm(model)
    gens = RunGenerators.from_seed(config.seed, device, world.rank)
    set_noise_generator(model, gens.noise)
    eval_gen = torch.Generator().manual_seed(EVAL_SUBSET_SEED)
    eval_idx = torch.randperm(n_train, generator=eval_gen)[: config.eval_train_size]
    history: list[dict[str, Any]] = []
    start_epoch = 0
    search: dict[str, Any] | None = None
    if previous is None:
        config.lr_decay_epochs = config.decay_epochs  # recorded: --resume keeps the schedule
        if config.lr is None:
            config.lr = config.default_lr
        initialize_model(model, config, splits)
        if config.lr_is_auto:
            lr, trials = distributed.broadcast_object(
                search_learning_rate(model, config, splits, eval_idx, log))
            config.lr, config.lr_auto = lr, True
            search = {"chosen_lr": lr, "steps": config.lr_search_steps,
                      "trials": [{"log10_lr": x, "loss": y} for x, y in trials]}
            log(f"lr search chose lr {lr:.4g}")
        if learned_noise_parameters(model) and config.noise_lr is None:
            config.noise_lr = noise_lr(config, float(config.lr))  # recorded
    optimizer = make_optimizer(model, config, float(config.lr))
    if previous is not None:
        payload = previous.payload
        model.load_state_dict(previous.model.state_dict())
        _load_optimizer_state(optimizer, payload["optimizer"], ckpt_path)
        gens.load_state(payload["rng_ranks"][world.rank] if "rng_ranks" in payload else payload["rng"])
        history = list(payload.get("history", []))
        start_epoch = int(payload["epoch"])
        search = payload.get("lr_search")
        log(f"resuming {run_dir} after epoch {start_epoch}")
        if world.is_main:  # a run killed between its checkpoint and metrics.csv catches up
            write_metrics_csv(run_dir / METRICS, history)
    config_record = {"format": "bnprobe.config", "version": 1, "bnprobe_version": __version__,
                     "config": config.to_dict(), "arch": {"name": config.arch, "kwargs": arch_kwargs},
                     "data": spec.to_dict()}
    if search is not None:
        config_record["lr_search"] = search
    if world.is_main:
        atomic_write_json(run_dir / CONFIG, config_record)
    if world.distributed:
        bn = "" if config.norm != "bn" else "; BN statistics over " + (
            "the global batch (--sync-bn)" if config.sync_bn else f"each process's {config.batch_size}")
        log(f"{world.size} processes x batch {config.batch_size} = global batch "
            f"{world.size * config.batch_size}{bn}")
    net = _ddp(model, device) if world.distributed else model

    after_step, regularizer = step_hooks(model, config, n_train)
    has_noise = bool(noise_modules(model))
    n_batches = n_train // (config.batch_size * world.size)
    for epoch in range(start_epoch, config.epochs):
        lr, factor = lr_at(config, epoch), lr_factor(config, epoch)
        for group in optimizer.param_groups:  # every group, learned noise too, by the same factor
            group["lr"] = group.get("initial_lr", float(config.lr)) * factor
        t0 = time.perf_counter()
        batches = training_batches(splits.train, config.batch_size, gens, config.augment,
                                   config.norm_batch, world)
        loss_sum, correct, seen = train_epoch(net, optimizer, batches, n_batches, progress,
                                              f"epoch {epoch + 1}/{config.epochs}", after_step,
                                              regularizer)
        train_loss, train_acc = _reduced_epoch_loss(loss_sum, correct, seen)
        distributed.broadcast_buffers(model)  # every process evaluates process 0's model
        if not math.isfinite(train_loss):
            raise BnprobeError(_diverged_message(train_loss, epoch, lr, run_dir))
        seconds = time.perf_counter() - t0
        precise = _precise_bn(model, config, splits, device)
        eval_loss, eval_acc = loss_and_accuracy(model, splits.train, eval_idx)
        val_loss, val_acc = loss_and_accuracy(model, splits.val)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
               "train_eval_loss": eval_loss, "train_eval_acc": eval_acc, "val_loss": val_loss,
               "val_acc": val_acc, "val_loss_mean": val_loss, "seconds": seconds}
        if precise is not None:
            row["precise_bn_images"] = precise["images"]
        last = epoch + 1 == config.epochs
        if has_noise and config.mc_every > 0 and ((epoch + 1) % config.mc_every == 0 or last):
            mc_gen = torch.Generator(device=device).manual_seed(config.seed + MC_SEED_OFFSET)
            row["val_loss_mc"], row["val_acc_mc"] = mc_loss_and_accuracy(
                model, splits.val, config.mc_samples, mc_gen)
        row.update(_epoch_noise_metrics(model, n_train, config.kl_weight))
        history.append(row)
        rng = distributed.all_gather_objects(gens.state())
        payload = {
            "arch": {"name": config.arch, "kwargs": arch_kwargs},
            "state_dict": model.state_dict(), "data": spec.to_dict(), "config": config.to_dict(),
            "epoch": epoch + 1, "optimizer": optimizer.state_dict(), "rng": rng[0],
            "history": history,
        }
        if world.distributed:
            payload["world_size"], payload["rng_ranks"] = world.size, rng
        if search is not None:
            payload["lr_search"] = search
        if precise is not None:
            payload["precise_bn"] = precise
        if world.is_main:
            save_checkpoint(ckpt_path, payload)
            write_metrics_csv(run_dir / METRICS, history)
        mc = f"  mc {row['val_loss_mc']:.4f}" if "val_loss_mc" in row else ""
        log(f"epoch {epoch + 1}/{config.epochs}  lr {lr:.4g}  train loss {train_loss:.4f} "
            f"(eval mode {eval_loss:.4f})  val loss {val_loss:.4f}{mc} acc {val_acc:.4f}  {seconds:.1f}s")
        if "sigma_rel_mean" in row:
            per_layer = " ".join(f"{v:.3g}" for k, v in row.items() if k.startswith("sigma_rel_")
                                 and k != "sigma_rel_mean")
            log(f"  learned noise sigma_S/s per layer: {per_layer}")
    set_noise_generator(model, None)  # the run's generator stays with the run
    return TrainResult(run_dir, model.eval(), history, config)
