"""A convolution followed by its normalization (the unit of every architecture); a channel affine."""

from __future__ import annotations

import torch
from torch import nn

from ..noise.functional import noise_then_affine


class ConvNorm(nn.Module):
    """``norm(conv(x))``, with the convolution and normalization as named submodules.

    The submodule names ``conv`` and ``norm`` are a convention that other parts of bnprobe
    rely on (finding scale-invariant weights, measuring BN layers, injecting noise).

    Args:
        conv: The convolution.
        norm: The normalization (``nn.Identity`` for none).
    """

    def __init__(self, conv: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized convolution output."""
        return self.norm(self.conv(x))


class ChannelAffine(nn.Module):
    """Per-channel affine ``y = x * s + b`` (dim 1), to put after a noise module.

    Args:
        channels: Number of channels.
        bias: Whether to learn ``b`` (init 0).
        scale: Whether to learn ``s`` (init 1).
    """

    channelwise = True  # a per-channel map: moment propagation keeps the spatial correlation

    def __init__(self, channels: int, bias: bool = True, scale: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.scale = nn.Parameter(torch.ones(channels)) if scale else None
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x * s + b``."""
        return noise_then_affine(x, self.scale, self.bias, None)

    def propagate(self, m: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Moments through the affine: ``(m s + b, v s^2)``."""
        if self.scale is not None:
            m, v = m * self.scale, v * self.scale * self.scale
        if self.bias is not None:
            m = m + self.bias
        return m, v

    def extra_repr(self) -> str:
        """Return the constructor arguments shown by ``repr``."""
        return f"{self.channels}, bias={self.bias is not None}, scale={self.scale is not None}"
