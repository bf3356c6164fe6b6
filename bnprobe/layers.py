"""BatchNorm layers, the model state bnprobe touches (restored on exit), hooks, channel moments."""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Iterator, Sequence

import torch
from torch import nn

from .errors import BnprobeError

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def find_bn_layers(
    model: nn.Module, patterns: Sequence[str] | str | None = None
) -> list[tuple[str, nn.Module]]:
    """All BatchNorm layers by qualified name, in registration order, optionally filtered.

    Args:
        model: The network.
        patterns: Glob patterns (``features.*.norm``) or exact names or integer indices (as
            strings) of BN layers to keep; None keeps all.

    Returns:
        ``[(name, module), ...]``.

    Raises:
        BnprobeError: When the network has no BN layer or a pattern matches none.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BN_TYPES)]
    if not layers:
        raise BnprobeError("the network has no BatchNorm layers to measure")
    if patterns is None:
        return layers
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    keep: set[int] = set()
    for pattern in patterns:
        hits = [i for i, (n, _) in enumerate(layers)
                if fnmatch.fnmatchcase(n, pattern) or (pattern.isdigit() and int(pattern) == i)]
        if not hits:
            names = ", ".join(n for n, _ in layers[:4])
            raise BnprobeError(f"layer pattern {pattern!r} matches no BN layer (layers: {names}, ...)")
        keep.update(hits)
    return [layers[i] for i in sorted(keep)]


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore training flags, buffers (running statistics, counters) and requires_grad on exit."""
    flags = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        for p, flag in grads.items():
            p.requires_grad_(flag)


@contextlib.contextmanager
def hooks_removed(handles: list) -> Iterator[list]:
    """Remove every hook handle in ``handles`` on exit, even after an error."""
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()
        handles.clear()


def reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    """Dimensions BN averages over: all but the channel dimension 1."""
    return (0, *range(2, x.dim()))


def spatial_size(x: torch.Tensor) -> int:
    """Number of spatial positions per channel of a BN input."""
    return int(x[0, 0].numel()) if x.dim() > 2 else 1


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean of each channel (dimension 1) over all other dimensions.

    Two vectorized passes with a first-order correction of the mean (relative error about
    1e-7 in float32). On CPU this is 4-6 times faster than ``torch.var_mean`` over
    non-contiguous dimensions, which dominated the time of ``measure``.

    Returns:
        ``(var, mean)`` in the dtype of ``x``.
    """
    dims = reduce_dims(x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = x.mean(dims)
    d = x - mean.view(shape)
    dm = d.mean(dims)
    var = d.square_().mean(dims).sub_(dm.square()).clamp_min_(0)
    return var, mean.add_(dm)
