"""Stochastic prediction modes: injected/learned noise, MCBN, parametric stochastic BN.

Each mode is a context manager factory ``mode(model)`` under which one forward pass is one
Monte-Carlo sample; the model's state is restored on exit.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import BnprobeError
from ..measure._layers import channel_moments, find_bn_layers, hooks_removed, preserved_state


def noise_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that draw noise in Monte-Carlo prediction (they have an ``mc`` flag)."""
    return [m for m in model.modules() if hasattr(m, "mc") and isinstance(m, nn.Module)]


def has_bn(model: nn.Module) -> bool:
    """Whether the model has BatchNorm layers."""
    return any(True for _ in _bn(model))


def _bn(model: nn.Module):
    try:
        return find_bn_layers(model)
    except BnprobeError:
        return []


@contextlib.contextmanager
def noise_mc(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Evaluation mode with every noise module drawing (``mc = True``); restored on exit.

    Yields:
        A callable to run before each sample (nothing to do for injected noise).
    """
    mods = noise_modules(model)
    flags = [m.mc for m in mods]
    was_training = model.training
    model.eval()
    try:
        for m in mods:
            m.mc = True
        yield lambda: None
    finally:
        for m, f in zip(mods, flags):
            m.mc = f
        model.train(was_training)


@contextlib.contextmanager
def mcbn(model: nn.Module, draw_batch: Callable[[], torch.Tensor]) -> Iterator[Callable[[], None]]:
    """MCBN (Teye et al. 2018): each sample normalizes with the statistics of a training batch.

    Before each sample call the yielded function: it runs one training batch with every BN in
    training mode, records each layer's biased batch mean and variance, and installs them as
    the statistics used in evaluation mode. Running statistics are restored on exit.

    Args:
        model: A network with BatchNorm layers.
        draw_batch: Returns a random training batch (inputs only) on the model's device.

    Yields:
        The per-sample resampling function.
    """
    layers = _bn(model)
    if not layers:
        raise BnprobeError("MCBN needs BatchNorm layers")
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles: list = []

    def hook(name):
        def fn(_m, inputs):
            var, mean = channel_moments(inputs[0].detach())
            captured[name] = (mean, var)

        return fn

    def resample() -> None:
        with hooks_removed(handles):
            for name, m in layers:
                handles.append(m.register_forward_pre_hook(hook(name)))
            for _, m in layers:
                m.train()
            with torch.no_grad():
                model(draw_batch())
            for name, m in layers:
                m.eval()
                m.running_mean.copy_(captured[name][0])
                m.running_var.copy_(captured[name][1])

    with preserved_state(model):
        model.eval()
        yield resample


@contextlib.contextmanager
def parametric_bn(
    model: nn.Module,
    sigmas: list[tuple[torch.Tensor, torch.Tensor]],
    generator: torch.Generator | None = None,
) -> Iterator[Callable[[], None]]:
    """Parametric stochastic BN: eval-mode BN with noise drawn from the fitted model.

    Each BN output becomes ``((x_hat + V) * U) * gamma + beta`` with V ~ N(0, sigma_v^2) and
    U ~ N(1, sigma_u^2) per input and channel (as the injected noise of ``bnprobe retrain``),
    x_hat normalized with the running statistics.

    Args:
        model: A network with BatchNorm layers.
        sigmas: Per BN layer (in network order) per-channel ``(sigma_v, sigma_u)``.
        generator: Generator on the model's device.

    Yields:
        A no-op per-sample function (noise is drawn in every forward).
    """
    layers = _bn(model)
    if len(layers) != len(sigmas):
        raise BnprobeError(f"the noise file has {len(sigmas)} layers, the network {len(layers)} BN layers")
    for (name, m), (sv, _su) in zip(layers, sigmas):
        if len(sv) != m.num_features:
            raise BnprobeError(
                f"noise file layer for {name} has {len(sv)} channels, the network {m.num_features}"
            )
    handles: list = []

    def hook(m, sv, su):
        def fn(_m, inputs, output):
            x = inputs[0]
            shape = (1, -1) + (1,) * (x.dim() - 2)
            x_hat = (x - m.running_mean.view(shape)) / (m.running_var.view(shape) + m.eps).sqrt()
            noise_shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
            v = torch.randn(noise_shape, generator=generator, device=x.device, dtype=x.dtype)
            u = torch.randn(noise_shape, generator=generator, device=x.device, dtype=x.dtype)
            y = (x_hat + v * sv.view(shape)) * (1 + u * su.view(shape))
            if m.affine:
                y = y * m.weight.view(shape) + m.bias.view(shape)
            return y

        return fn

    with preserved_state(model), hooks_removed(handles):
        model.eval()
        for (_, m), (sv, su) in zip(layers, sigmas):
            dev = m.running_mean.device
            handles.append(
                m.register_forward_hook(
                    hook(m, torch.as_tensor(sv, device=dev), torch.as_tensor(su, device=dev))
                )
            )
        yield lambda: None
