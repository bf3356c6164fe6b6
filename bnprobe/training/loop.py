"""``train``: the training loop behind ``bnprobe train``, resumable and reproducible."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from .._version import __version__
from ..checkpoint import open_checkpoint, save_checkpoint
from ..data import DataSpec, ImageData, load_dataset, make_splits
from ..errors import BnprobeError
from ..io import atomic_write_json
from ..models import build_model, default_arch_kwargs
from ..options import Optimizer, resolve_device
from ..progress import progress_bar
from .config import TrainConfig, lr_at
from .evaluate import loss_and_accuracy
from .run_files import CHECKPOINT, CONFIG, METRICS, write_metrics_csv

EVAL_SUBSET_SEED = 0


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


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if Optimizer.parse(config.optimizer) is Optimizer.ADAM:
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=True,
                           weight_decay=config.weight_decay)


def _device_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Any,
    total: int | None = None,
    progress: bool = False,
    desc: str = "train",
    after_step: list[Callable[[], None]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One pass of SGD over ``batches`` in training mode.

    Returns:
        Summed loss and correct count (as tensors, to avoid a device sync per step) and the
        number of samples.
    """
    model.train()
    loss_sum = correct = None
    seen = 0
    for x, y in progress_bar(batches, total=total, enabled=progress, desc=desc):
        out = model(x)
        loss = F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for hook in after_step or ():
            hook()
        with torch.no_grad():
            batch_loss = loss.detach() * len(y)
            batch_correct = (out.argmax(1) == y).sum()
            loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
            correct = batch_correct if correct is None else correct + batch_correct
        seen += len(y)
    return loss_sum, correct, seen


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
    log = log or (lambda _msg: None)
    device = resolve_device(config.device)
    previous = None
    if resume:
        previous = open_checkpoint(ckpt_path, device=device)
        if previous.payload is None:
            raise BnprobeError(f"{ckpt_path} is not a bnprobe training checkpoint")
        old = TrainConfig.from_dict(previous.config)
        diff = old.differences(config)
        if diff:
            raise BnprobeError(f"cannot resume with changed options: {', '.join(diff)}")
    elif ckpt_path.exists():
        raise BnprobeError(f"{run_dir} already holds a run; use --resume or another --out")

    if data is None:
        data = load_dataset(config.dataset, config.data_root, image_size=config.image_size)
    spec = DataSpec.from_data(data, translate=config.translate if config.augment else 0)
    subset_gen = torch.Generator().manual_seed(config.seed + 2)
    splits = make_splits(data, spec, device, config.limit_train, subset_gen)
    if len(splits.train) < config.batch_size:
        raise BnprobeError(
            f"the training set has {len(splits.train)} images, fewer than --batch-size {config.batch_size}"
        )
    arch_kwargs = default_arch_kwargs(config.arch, spec.num_classes, spec.input_shape[0],
                                      config.width, config.norm)
    model = build_model(config.arch, arch_kwargs, seed=config.seed).to(device)
    optimizer = _make_optimizer(model, config)
    order_gen = torch.Generator().manual_seed(config.seed)
    aug_gen = _device_generator(device, config.seed + 1)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if previous is not None:
        payload = previous.payload
        model.load_state_dict(previous.model.state_dict())
        optimizer.load_state_dict(payload["optimizer"])
        order_gen.set_state(payload["rng"]["order"])
        aug_gen.set_state(payload["rng"]["augment"].to(aug_gen.get_state().device))
        history = list(payload.get("history", []))
        start_epoch = int(payload["epoch"])
        log(f"resuming {run_dir} after epoch {start_epoch}")
    config_record = {"format": "bnprobe.config", "version": 1, "bnprobe_version": __version__,
                     "config": config.to_dict(), "arch": {"name": config.arch, "kwargs": arch_kwargs},
                     "data": spec.to_dict()}
    atomic_write_json(run_dir / CONFIG, config_record)

    eval_gen = torch.Generator().manual_seed(EVAL_SUBSET_SEED)
    eval_idx = torch.randperm(len(splits.train), generator=eval_gen)[: config.eval_train_size]
    n_batches = len(splits.train) // config.batch_size
    for epoch in range(start_epoch, config.epochs):
        lr = lr_at(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        batches = splits.train.iterate(config.batch_size, shuffle=True, augmented=config.augment,
                                       generator=order_gen, aug_generator=aug_gen, drop_last=True)
        loss_sum, correct, seen = train_epoch(model, optimizer, batches, n_batches, progress,
                                              f"epoch {epoch + 1}/{config.epochs}")
        train_loss = loss_sum.item() / seen
        if not math.isfinite(train_loss):
            raise BnprobeError(
                f"training loss became {train_loss} in epoch {epoch + 1}; the last good checkpoint "
                f"(epoch {epoch}) is kept in {run_dir}. Try a smaller --lr"
            )
        seconds = time.perf_counter() - t0
        eval_loss, eval_acc = loss_and_accuracy(model, splits.train, eval_idx)
        val_loss, val_acc = loss_and_accuracy(model, splits.val)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": correct.item() / seen,
               "train_eval_loss": eval_loss, "train_eval_acc": eval_acc, "val_loss": val_loss,
               "val_acc": val_acc, "seconds": seconds}
        history.append(row)
        save_checkpoint(ckpt_path, {
            "arch": {"name": config.arch, "kwargs": arch_kwargs},
            "state_dict": model.state_dict(), "data": spec.to_dict(), "config": config.to_dict(),
            "epoch": epoch + 1, "optimizer": optimizer.state_dict(),
            "rng": {"order": order_gen.get_state(), "augment": aug_gen.get_state().cpu()},
            "history": history,
        })
        write_metrics_csv(run_dir / METRICS, history)
        log(f"epoch {epoch + 1}/{config.epochs}  lr {lr:.4g}  train loss {train_loss:.4f} "
            f"(eval mode {eval_loss:.4f})  val loss {val_loss:.4f} acc {val_acc:.4f}  {seconds:.1f}s")
    return TrainResult(run_dir, model.eval(), history, config)
