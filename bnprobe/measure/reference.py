"""Population statistics of every BN layer's input, computed exactly in float64."""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from ..progress import progress_bar
from ._layers import channel_moments, hooks_removed
from ._source import InputSource


class _StopForward(Exception):
    """Raised by the last hook to skip the rest of the network."""


class _Moments:
    """Running per-channel mean and M2 (Chan et al. parallel update) in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        # Per-batch moments in the input's dtype (two passes, see channel_moments), combined
        # across batches in float64: exact enough and far cheaper than casting activations.
        n = x.numel() // x.shape[1]
        var, mean = channel_moments(x.detach())
        var, mean = var.to(torch.float64), mean.to(torch.float64)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, var * n
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta.square() * (self.count * n / total)
        self.count = total

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / self.count


@torch.no_grad()
def population_statistics(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    source: InputSource,
    cap: int = 10000,
    batch_size: int = 500,
    generator: torch.Generator | None = None,
    aug_generator: torch.Generator | None = None,
    progress: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and (biased) variance of each layer's input over the data, every BN in eval mode.

    The caller is responsible for restoring the model state (see ``preserved_state``).

    Args:
        model: The network.
        layers: ``(name, module)`` of the BN layers to measure.
        source: The inputs.
        cap: Use at most this many inputs (the first ``cap`` of a seeded permutation).
        batch_size: Inputs per forward pass.
        generator: CPU generator for the subset.
        aug_generator: Device generator for augmentation (when the source augments).
        progress: Show a progress bar.

    Returns:
        name -> (mean, var), float64 tensors of shape (C,) on the model's device.
    """
    model.eval()
    acc = {name: _Moments() for name, _ in layers}
    last = layers[-1][1]
    handles = []

    def hook(name: str, module: nn.Module):
        def fn(_m: nn.Module, inputs: tuple) -> None:
            acc[name].update(inputs[0])
            if module is last:
                raise _StopForward
        return fn

    n = min(cap, len(source))
    order = torch.randperm(len(source), generator=generator)[:n] if n < len(source) else torch.arange(n)
    with hooks_removed(handles):
        for name, module in layers:
            handles.append(module.register_forward_pre_hook(hook(name, module)))
        starts = range(0, n, batch_size)
        for start in progress_bar(starts, total=len(starts), enabled=progress, desc="reference"):
            with contextlib.suppress(_StopForward):
                model(source.get(order[start : start + batch_size], aug_generator))
    return {name: (m.mean, m.var) for name, m in acc.items()}
