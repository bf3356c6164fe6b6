"""Building and initializing the model of a run: architecture arguments, noise, data init."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..data import DataSpec, Splits
from ..models import default_arch_kwargs
from ..models.allcnn import layer_channels
from ..norms.init import DDI_BATCH, data_dependent_init_, init_input_moments_
from ..norms.inject import check_noise_layers, kl_total, noise_kwargs_from_spec
from ..norms.projection import param_groups_no_decay, project_scale_invariant_
from ..options import LearnNoise, Norm, Optimizer
from .config import TrainConfig

DDI_SEED_OFFSET = 5


def run_arch_kwargs(config: TrainConfig, spec: DataSpec) -> dict[str, Any]:
    """Architecture arguments of a run: everything needed to rebuild its model.

    The noise of ``config.noise`` (a fitted.json) is stored as plain lists, so a checkpoint
    rebuilds the model without the file.

    Raises:
        BnprobeError: For a missing or invalid noise file.
    """
    kwargs = default_arch_kwargs(config.arch, spec.num_classes, spec.input_shape[0], config.width,
                                 config.norm)
    if config.arch != "allcnn":
        return kwargs
    if config.noise is not None:
        noise = noise_kwargs_from_spec(config.noise, config.noise_granularity, config.noise_scale)
        channels = layer_channels(spec.num_classes, config.width)
        check_noise_layers(noise, channels, where=f"noise file {config.noise}")
        kwargs["noise"] = noise
    if config.learn_noise != LearnNoise.OFF.value:
        kwargs["learn_noise"] = config.learn_noise
        kwargs["prior_std"] = float(config.prior_std)
    return kwargs


def initialize_model(model: nn.Module, config: TrainConfig, splits: Splits) -> None:
    """Initialization from the training data, before the first step of a fresh run.

    Projects the scale-invariant weights (with ``config.project``), fills AN input moments
    from the normalized training images and, with ``config.data_init``, runs the
    data-dependent init of none/wn nets on ``DDI_BATCH`` random training images.
    """
    if config.project:
        project_scale_invariant_(model)
    train = splits.train
    init_input_moments_(model, train.images, splits.spec.mean, splits.spec.std)
    if config.data_init and Norm(config.norm) in (Norm.NONE, Norm.WN):
        gen = torch.Generator().manual_seed(config.seed + DDI_SEED_OFFSET)
        idx = torch.randperm(len(train), generator=gen)[:DDI_BATCH]
        data_dependent_init_(model, train.batch(idx)[0])


def make_optimizer(model: nn.Module, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (Nesterov) or Adam; with projection, the scale-invariant weights get no decay."""
    if config.project:
        params: Any = param_groups_no_decay(model, config.weight_decay)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    if Optimizer.parse(config.optimizer) is Optimizer.ADAM:
        return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=config.momentum, nesterov=True,
                           weight_decay=config.weight_decay)


def step_hooks(
    model: nn.Module, config: TrainConfig, train_size: int
) -> tuple[list[Callable[[], None]], Callable[[], torch.Tensor] | None]:
    """What every training step adds: the projection, and the KL term of learned noise.

    Returns:
        ``(after_step, regularizer)``: hooks run after each optimizer step, and the loss term
        ``kl_weight * KL_total / train_size`` (None without learned noise).
    """
    after = [lambda: project_scale_invariant_(model)] if config.project else []
    regularizer = None
    if kl_total(model) is not None and config.kl_weight > 0:
        factor = config.kl_weight / train_size

        def regularizer() -> torch.Tensor:
            return kl_total(model) * factor

    return after, regularizer
