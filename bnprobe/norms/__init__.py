"""Normalizations: the one place where a network's normalization is chosen."""

from __future__ import annotations

from torch import nn

from ..errors import BnprobeError
from ..options import Norm
from .block import ConvNorm

__all__ = ["ConvNorm", "make_conv_norm"]


def make_conv_norm(
    norm: str | Norm,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
) -> ConvNorm:
    """Build a convolution followed by the chosen normalization.

    Args:
        norm: ``none`` (a conv with bias), ``bn`` (conv without bias, then BatchNorm2d).
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Square kernel size.
        stride: Convolution stride.
        padding: Zero padding.

    Returns:
        A ``ConvNorm`` block.
    """
    kind = Norm.parse(norm, "norm")
    if kind is Norm.NONE:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=True)
        return ConvNorm(conv, nn.Identity())
    if kind is Norm.BN:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        return ConvNorm(conv, nn.BatchNorm2d(out_channels))
    raise BnprobeError(f"norm {kind.value!r} is not available yet in this version of bnprobe")
