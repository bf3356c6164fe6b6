"""Normalizations: the one place where a network's normalization is chosen."""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..errors import BnprobeError
from ..options import Norm
from .an import ANConv2d, InputMoments
from .an_network import ANNetwork
from .block import ChannelAffine, ConvNorm
from .bn import NoisyBatchNorm2d
from .convert import convert_bn_network
from .standalone import ANNorm, FixedNorm
from .tracing import bn_sites, normalized_channels, normalized_layers
from .wn import WNConv2d, WNLinear

__all__ = [
    "ANConv2d",
    "ANNetwork",
    "ANNorm",
    "ChannelAffine",
    "ConvNorm",
    "FixedNorm",
    "InputMoments",
    "NoisyBatchNorm2d",
    "WNConv2d",
    "WNLinear",
    "bn_sites",
    "convert_bn_network",
    "make_conv_norm",
    "normalized_channels",
    "normalized_layers",
]


def make_conv_norm(
    norm: str | Norm,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    noise: Optional[nn.Module] = None,
) -> ConvNorm:
    """Build a convolution followed by the chosen normalization.

    Every normalized block writes its output as ``(w.x - mu(w)) / sigma(w) [-> noise] * s + b``,
    scale invariant in ``w``:

    * ``none``: a conv with bias (no normalization; noise is not allowed);
    * ``bn``: conv without bias, then BatchNorm2d (``NoisyBatchNorm2d`` with noise);
    * ``wn``: :class:`~bnprobe.norms.wn.WNConv2d` (``mu = 0``, ``sigma = ||w||``);
    * ``an``: :class:`~bnprobe.norms.an.ANConv2d` (analytic moments; the model must
      propagate input moments before each forward, see :mod:`bnprobe.norms.an`).

    For wn and an the conv module does everything and ``norm`` is ``nn.Identity``.

    Args:
        norm: ``none``, ``bn``, ``wn`` or ``an``.
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Square kernel size.
        stride: Convolution stride.
        padding: Zero padding.
        noise: Optional noise module (``FixedNoise``, ``LearnedNoise``) applied to the
            normalized output before the affine; one that ``provides_affine`` replaces it.

    Returns:
        A ``ConvNorm`` block.

    Raises:
        BnprobeError: For noise with ``none``.
    """
    kind = Norm.parse(norm, "norm")
    if kind is Norm.NONE:
        if noise is not None:
            raise BnprobeError("noise is injected after a normalization: use --norm bn, wn or an, not none")
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=True)
        return ConvNorm(conv, nn.Identity())
    if kind is Norm.BN:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        bn = nn.BatchNorm2d(out_channels) if noise is None else NoisyBatchNorm2d(out_channels, noise)
        return ConvNorm(conv, bn)
    affine = noise is None or not getattr(noise, "provides_affine", False)
    layer = WNConv2d if kind is Norm.WN else ANConv2d
    conv = layer(in_channels, out_channels, kernel_size, stride, padding,
                 bias=affine, scale=affine, noise=noise)
    return ConvNorm(conv, nn.Identity())

