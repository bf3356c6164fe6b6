"""Building and initializing the model of a run: architecture arguments, noise, data init."""

from __future__ import annotations

from typing import Any, Callable, Union

import torch
from torch import nn

from ..data import DataSpec, Splits
from ..models import default_arch_kwargs
from ..models.registry import noise_layers
from ..noise.network import (
    kl_total,
    learned_noise_parameters,
    noise_kwargs_from_spec,
    set_relative_sigma_,
)
from ..norms.convert import align_noise
from ..norms.init import DDI_BATCH, data_dependent_init_, init_input_moments_
from ..norms.projection import param_groups_no_decay, project_scale_invariant_
from ..options import NOISE_ADAM_LR, LearnNoise, Norm, Optimizer
from .config import TrainConfig

DDI_SEED_OFFSET = 5
#: Name of the optimizer parameter group of the learned noise's u and s.
NOISE_GROUP = "noise"


def run_arch_kwargs(config: TrainConfig, spec: DataSpec) -> dict[str, Any]:
    """Architecture arguments of a run: everything needed to rebuild its model.

    The noise of ``config.noise`` (a fitted.json) is stored as plain lists, so a checkpoint
    rebuilds the model without the file. For a torchvision model its layers are matched to
    the model's BN layers by name (as ``bnprobe measure`` writes them), else by position.

    Raises:
        BnprobeError: For a missing or invalid noise file.
    """
    kwargs = default_arch_kwargs(config.arch, spec.num_classes, spec.input_shape[0], config.width,
                                 config.norm)
    if config.noise is not None:
        noise = noise_kwargs_from_spec(config.noise, config.noise_granularity, config.noise_scale)
        names, channels = noise_layers(config.arch, kwargs)
        kwargs["noise"] = align_noise(noise, names, channels, where=f"noise file {config.noise}")
    if config.learn_noise != LearnNoise.OFF.value:
        kwargs["learn_noise"] = config.learn_noise
        kwargs["prior_std"] = float(config.prior_std)
    return kwargs


def initialize_model(model: nn.Module, config: TrainConfig, splits: Splits) -> None:
    """Initialization from the training data, before the first step of a fresh run.

    Projects the scale-invariant weights (with ``config.project``), sets learned noise to
    ``sigma_S / s = config.noise_init`` (when given), fills AN input moments
    from the normalized training images and, with ``config.data_init``, runs the
    data-dependent init of none/wn nets on ``DDI_BATCH`` random training images.
    """
    if config.project:
        project_scale_invariant_(model)
    if config.noise_init is not None:
        set_relative_sigma_(model, float(config.noise_init))
    train = splits.train
    init_input_moments_(model, train.images, splits.spec.mean, splits.spec.std)
    if config.data_init and Norm(config.norm) in (Norm.NONE, Norm.WN):
        gen = torch.Generator().manual_seed(config.seed + DDI_SEED_OFFSET)
        idx = torch.randperm(len(train), generator=gen)[:DDI_BATCH]
        data_dependent_init_(model, train.batch(idx)[0])


class OptimizerChain:
    """Several torch optimizers stepped as one (e.g. SGD for the weights, Adam for the noise).

    It offers what training uses of an optimizer: ``param_groups`` (all groups, in order),
    ``zero_grad``, ``step``, ``state_dict`` and ``load_state_dict`` (a dict of plain types and
    tensors, loadable with ``weights_only=True``).

    Args:
        optimizers: The optimizers, each with its own parameters.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every parameter group of every optimizer."""
        return [group for opt in self.optimizers for group in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every optimizer."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        """One step of every optimizer."""
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizers": [state_dict, ...]}``."""
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Raises:
            ValueError: If it holds another number of optimizers.
        """
        saved = state.get("optimizers") if isinstance(state, dict) else None
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise ValueError(f"expected the state of {len(self.optimizers)} optimizers")
        for opt, sd in zip(self.optimizers, saved):
            opt.load_state_dict(sd)


TrainOptimizer = Union[torch.optim.Optimizer, OptimizerChain]


def noise_lr(config: TrainConfig, lr: float) -> float:
    """Initial learning rate of the learned-noise group: ``config.noise_lr`` or its default.

    The default is ``NOISE_ADAM_LR`` with Adam and ``lr`` (the weights' rate) with SGD.
    """
    if config.noise_lr is not None:
        return float(config.noise_lr)
    return NOISE_ADAM_LR if Optimizer.parse(config.noise_optimizer) is Optimizer.ADAM else float(lr)


def _build(kind: Optimizer, groups: list[dict[str, Any]], config: TrainConfig, lr: float
           ) -> torch.optim.Optimizer:
    if kind is Optimizer.ADAM:
        return torch.optim.Adam(groups, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=True,
                           weight_decay=config.weight_decay)


def make_optimizer(model: nn.Module, config: TrainConfig, lr: float) -> TrainOptimizer:
    """SGD (Nesterov) or Adam, with parameter groups named ``decay``, ``no_decay``, ``noise``.

    With projection the scale-invariant weights (``no_decay``) get no weight decay. The
    parameters of learned noise (``u`` and ``s``, see
    :func:`bnprobe.noise.network.learned_noise_parameters`) form the ``noise`` group: no
    weight decay, rate :func:`noise_lr`, optimizer ``config.noise_optimizer``; when that
    differs from ``config.optimizer`` the result is an :class:`OptimizerChain`. Every group
    records its initial rate as ``initial_lr``; training's schedule multiplies the rate of
    every group, ``noise`` included, by the same factor (see
    :func:`bnprobe.training.config.lr_factor`).

    Args:
        model: The model.
        config: The run's options.
        lr: Initial learning rate of the weights.

    Returns:
        The optimizer.
    """
    noise = learned_noise_parameters(model)
    noise_ids = {id(p) for p in noise}
    if config.project:
        groups = param_groups_no_decay(model, config.weight_decay)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad],
                   "weight_decay": float(config.weight_decay), "name": "decay"}]
    for group in groups:
        group["params"] = [p for p in group["params"] if id(p) not in noise_ids]
        group["lr"] = group["initial_lr"] = float(lr)
    groups = [g for g in groups if g["params"]]
    kind = Optimizer.parse(config.optimizer)
    if not noise:
        return _build(kind, groups, config, lr)
    rate = noise_lr(config, lr)
    noise_group = {"params": noise, "weight_decay": 0.0, "name": NOISE_GROUP, "lr": rate, "initial_lr": rate}
    noise_kind = Optimizer.parse(config.noise_optimizer)
    if noise_kind is kind or not groups:
        return _build(noise_kind if not groups else kind, groups + [noise_group], config, lr)
    return OptimizerChain([_build(kind, groups, config, lr), _build(noise_kind, [noise_group], config, rate)])


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
