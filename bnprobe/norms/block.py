"""A convolution followed by its normalization: the unit every architecture is built from."""

from __future__ import annotations

import torch
from torch import nn


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
