"""``--lr auto``: choose the learning rate by short trial runs from the same initialization."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Callable

import torch
from torch import nn

from ..data import Splits
from ..lr_search import search_lr
from ..noise.network import set_noise_generator
from ..options import Optimizer
from .config import TrainConfig
from .evaluate import loss_and_accuracy
from .setup import make_optimizer, step_hooks
from .steps import RunGenerators, train_epoch, training_batches

#: log10 learning-rate search ranges per optimizer.
SEARCH_RANGE = {Optimizer.SGD: (-4.0, 0.0), Optimizer.ADAM: (-5.0, -1.0)}


def trial_loss(
    model: nn.Module,
    config: TrainConfig,
    splits: Splits,
    lr: float,
    steps: int,
    eval_index: torch.Tensor,
) -> float:
    """Evaluation-mode training loss after ``steps`` steps at a constant ``lr``.

    The model is copied (left untouched) and trained with the run's seeded generators, so
    every trial starts from the same weights and sees the same batches.

    Returns:
        The loss on ``eval_index`` of the training set, ``inf`` if training diverged.
    """
    trial = copy.deepcopy(model)
    gens = RunGenerators.from_seed(config.seed, splits.train.device)
    set_noise_generator(trial, gens.noise)
    optimizer = make_optimizer(trial, config, lr)
    after, regularizer = step_hooks(trial, config, len(splits.train))
    per_epoch = len(splits.train) // config.batch_size
    done = 0
    while done < steps:
        take = min(per_epoch, steps - done)
        batches = training_batches(splits.train, config.batch_size, gens, config.augment,
                                   config.norm_batch)
        loss_sum, _, _ = train_epoch(trial, optimizer, itertools.islice(batches, take),
                                     after_step=after, regularizer=regularizer)
        if not math.isfinite(loss_sum.item()):
            return math.inf
        done += take
    loss, _ = loss_and_accuracy(trial, splits.train, eval_index)
    return loss if math.isfinite(loss) else math.inf


def search_learning_rate(
    model: nn.Module,
    config: TrainConfig,
    splits: Splits,
    eval_index: torch.Tensor,
    log: Callable[[str], None] = lambda _msg: None,
) -> tuple[float, list[tuple[float, float]]]:
    """Search log10(lr) (bracketing plus golden section) minimizing :func:`trial_loss`.

    Each of the ``config.lr_search_trials`` trials trains for ``config.lr_search_steps``
    steps at a constant rate; the chosen rate is never one whose next larger tried rate
    diverged (see :func:`bnprobe.lr_search.choose`).

    Returns:
        ``(lr, history)`` with ``history`` the ``(log10_lr, loss)`` of every trial.
    """
    steps = config.lr_search_steps
    lo, hi = SEARCH_RANGE[Optimizer.parse(config.optimizer)]

    def objective(log_lr: float) -> float:
        loss = trial_loss(model, config, splits, 10.0**log_lr, steps, eval_index)
        log(f"lr search: lr {10.0**log_lr:.4g}  loss after {steps} steps {loss:.4f}")
        return loss

    best, history = search_lr(objective, lo, hi, evaluations=config.lr_search_trials)
    return 10.0**best, history
