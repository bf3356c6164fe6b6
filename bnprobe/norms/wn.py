"""Weight normalization (Salimans & Kingma 2016) as plain modules.

``y = conv(x, w / ||w||) * s + b`` with the norm taken per output channel. The modules hold
ordinary parameters (no parametrizations or hooks), so they deepcopy, pickle, round-trip
through ``state_dict`` and work under DDP like any ``nn.Module``.

Scale-invariance protocol: every module whose raw weight can be rescaled per output unit
without changing its output exposes ``scale_invariant_weights() -> list[Parameter]``;
:func:`bnprobe.norms.projection.scale_invariant_weights` collects them.

Noise hook: an optional ``noise`` submodule (see :mod:`bnprobe.noise.modules`) is applied to the
normalized output ``x_hat`` BEFORE the affine ``* s + b``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..noise.functional import noise_then_affine
from .moment_maps import conv2d_map_moments, crop_unused_taps
from .moments import conv_moments

__all__ = [
    "WNConv2d",
    "WNLinear",
    "affine_moments",
    "normalized_conv2d",
    "normalize_rows",
]

_IntPair = Union[int, tuple[int, int]]

# Norms are clamped at this value; above it the normalization is exactly scale invariant.
NORM_FLOOR = 1e-12


def normalize_rows(weight: Tensor) -> Tensor:
    """Divide each output unit's weights (a slice along dim 0) by its L2 norm.

    Args:
        weight: Weight of shape ``(C_out, ...)``.

    Returns:
        The differentiable normalized weight, same shape (norms floored at ``1e-12``).
    """
    norms = torch.linalg.vector_norm(weight.reshape(weight.shape[0], -1), dim=1)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight / norms.clamp_min(NORM_FLOOR).reshape(shape)


def _pair(value: _IntPair) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _check_groups(in_channels: int, out_channels: int, groups: int) -> int:
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(f"groups={groups} must be positive and divide in_channels={in_channels} "
                         f"and out_channels={out_channels}")
    return int(groups)


def _mul(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    # product of factors where None stands for 1
    if a is None:
        return b
    return a if b is None else a * b


def _shift_times(shift: Optional[Tensor], factor: Optional[Tensor]) -> Optional[Tensor]:
    # shift * factor, where a missing shift is 0 and a missing factor is 1
    if shift is None or factor is None:
        return shift
    return shift * factor


def _affine_shift(
    shift: Optional[Tensor], scale: Optional[Tensor], bias: Optional[Tensor]
) -> Optional[Tensor]:
    # shift * scale + bias, where a missing shift or bias is 0 and a missing scale is 1
    if shift is None:
        return bias
    return _add(_mul(shift, scale), bias)


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    # sum of terms where None stands for 0
    if a is None:
        return b
    return a if b is None else a + b


def normalized_conv2d(
    x: Tensor,
    weight: Tensor,
    pre_scale: Optional[Tensor],
    pre_shift: Optional[Tensor],
    scale: Optional[Tensor],
    bias: Optional[Tensor],
    noise: Optional[nn.Module],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int = 1,
) -> Tensor:
    """``((conv(x, weight) * pre_scale + pre_shift) [-> noise]) * scale + bias`` in one pass.

    Every per-channel factor is folded into the convolution's weight and bias, so a
    deterministic layer costs one biased convolution -- or, when the output has fewer
    elements than the weight (small feature maps, e.g. deep layers of ImageNet nets on
    32x32 images), into one fused multiply-add over the output, which is cheaper than
    scaling the weight and back-propagating through that. A noise module with
    ``affine_coefficients(batch, ref)`` (per-sample ``x_hat * A + C``) adds one fused
    multiply-add over the output (the per-channel factors join ``A``); other noise modules
    are applied unfused. Kernel taps that read only zero padding for this input size (a 3x3
    kernel on a 1x1 map uses its centre only) are cropped away first: exact, and the deep
    layers of ImageNet networks on 32x32 images then cost a fraction of their full kernels.

    Args:
        x: Input ``(N, C_in, H, W)``.
        weight: Raw convolution weight ``(C_out, C_in / groups, kh, kw)``.
        pre_scale: Per-channel factor giving ``x_hat`` (e.g. ``1 / sigma``), or None.
        pre_shift: Per-channel shift giving ``x_hat`` (e.g. ``-mu / sigma``), or None.
        scale: Affine scale ``s`` or None.
        bias: Affine bias ``b`` or None.
        noise: Noise module applied to ``x_hat``, or None.
        stride: Convolution stride.
        padding: Zero padding.
        dilation: Dilation.
        groups: Convolution groups.

    Returns:
        The layer output ``(N, C_out, H', W')``.
    """
    if not isinstance(padding, str):  # taps that read only padding (3x3 on a 1x1 map) are skipped
        size, dilation = x.shape[-2:], _pair(dilation)
        weight, padding = crop_unused_taps(weight, size, _pair(stride), _pair(padding), dilation)
    coefficients = None
    if noise is not None:
        get = getattr(noise, "affine_coefficients", None)
        if get is None:
            w = weight if pre_scale is None else weight * pre_scale.reshape(-1, 1, 1, 1)
            x_hat = F.conv2d(x, w, pre_shift, stride, padding, dilation, groups)
            return noise_then_affine(x_hat, scale, bias, noise)
        coefficients = get(x.shape[0], weight)
    if coefficients is None or coefficients[0].dim() == 1:
        mul, add = (None, None) if coefficients is None else coefficients
        total = _mul(_mul(pre_scale, mul), scale)
        shift = _affine_shift(_add(_shift_times(pre_shift, mul), add), scale, bias)
        if total is None or not _output_is_smaller(x, weight, stride, padding, dilation):
            w = weight if total is None else weight * total.reshape(-1, 1, 1, 1)
            return F.conv2d(x, w, shift, stride, padding, dilation, groups)
        y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        if shift is None:
            return y * total[None, :, None, None]
        return torch.addcmul(shift[None, :, None, None], y, total[None, :, None, None])
    mul, add = coefficients  # (N, C): per-sample noise
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    shift = _affine_shift(_add(_shift_times(pre_shift, mul), add), scale, bias)
    mul = _mul(mul, _mul(pre_scale, scale))
    if shift is None:
        return y * mul[:, :, None, None]
    return torch.addcmul(shift[:, :, None, None], y, mul[:, :, None, None])


def _output_is_smaller(
    x: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]
) -> bool:
    """Whether ``conv2d(x, weight)`` has fewer elements than ``weight``."""
    size = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in range(2)]
    return x.shape[0] * weight.shape[0] * size[0] * size[1] < weight.numel()


def affine_moments(
    m: Tensor,
    v: Tensor,
    scale: Optional[Tensor],
    bias: Optional[Tensor],
    noise: Optional[nn.Module],
) -> tuple[Tensor, Tensor]:
    """Moments through :func:`~bnprobe.noise.functional.noise_then_affine` (noise eval map, affine).

    Args:
        m: Channel means of ``x_hat``.
        v: Channel variances of ``x_hat``.
        scale: Per-channel scale or None.
        bias: Per-channel bias or None.
        noise: A module with ``propagate(m, v)`` or None.

    Returns:
        ``(mean, var)`` of the output.

    Raises:
        TypeError: If ``noise`` has no ``propagate`` method.
    """
    if noise is not None:
        if not callable(getattr(noise, "propagate", None)):
            raise TypeError(f"noise module {type(noise).__name__} has no propagate(m, v) method")
        m, v = noise.propagate(m, v)
    if scale is not None:
        m, v = m * scale, v * scale * scale
    if bias is not None:
        m = m + bias
    return m, v


class _WNBase(nn.Module):
    """Shared parameters of WN modules: raw ``weight``, ``scale`` s, ``bias`` b, ``noise``."""

    def _init_params(
        self, weight_shape: tuple[int, ...], bias: bool, scale: bool, noise: Optional[nn.Module]
    ) -> None:
        out = weight_shape[0]
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.scale = nn.Parameter(torch.ones(out)) if scale else None
        self.bias = nn.Parameter(torch.zeros(out)) if bias else None
        self.register_module("noise", noise)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialize ``weight`` like ``nn.Conv2d``/``nn.Linear``, ``scale`` = 1, ``bias`` = 0."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.scale is not None:
            nn.init.ones_(self.scale)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def normalized_weight(self) -> Tensor:
        """Return ``weight / ||weight||`` with the norm per output unit (differentiable)."""
        return normalize_rows(self.weight)

    def scale_invariant_weights(self) -> list[nn.Parameter]:
        """Return the weights whose per-unit scale does not affect the output: ``[weight]``."""
        return [self.weight]

    def propagate(self, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Channel moments of the output given independent inputs with moments ``(m, v)``.

        Args:
            m: Input channel means ``(C_in,)``.
            v: Input channel variances ``(C_in,)``.

        Returns:
            ``(mean, var)`` per output channel (noise at its eval-mode map; border effects of
            zero padding ignored).
        """
        mu, var = conv_moments(m, v, self.normalized_weight(), groups=getattr(self, "groups", 1))
        return affine_moments(mu, var, self.scale, self.bias, self.noise)


class WNConv2d(_WNBase):
    """Weight-normalized 2-D convolution: ``conv2d(x, w / ||w||) [-> noise] * s + b``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel size (int or pair).
        stride: Stride.
        padding: Zero padding.
        dilation: Dilation.
        groups: Convolution groups (``in_channels`` and ``out_channels`` divisible by it;
            the norm of each output channel is over its ``in_channels / groups`` inputs).
        bias: Whether to learn the output bias ``b`` (init 0).
        scale: Whether to learn the output scale ``s`` (init 1); without it the output is the
            normalized ``x_hat`` (e.g. when a ``LearnedNoise`` provides its own affine).
        noise: Optional module applied to ``x_hat`` before the affine.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntPair,
        stride: _IntPair = 1,
        padding: _IntPair = 0,
        dilation: _IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        scale: bool = True,
        noise: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = _check_groups(in_channels, out_channels, groups)
        self._init_params((out_channels, in_channels // groups) + self.kernel_size, bias, scale, noise)

    def propagate(self, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Output moments given independent inputs with moments ``(m, v)``.

        Args:
            m: Input channel means ``(C_in,)`` (every tap counts: interior positions), or a
                position map ``(H, W, C_in)`` (:mod:`bnprobe.norms.moment_maps`; the padded
                border is exact).
            v: Input variances, same shape.

        Returns:
            ``(mean, var)`` per output channel, or maps ``(H', W', C_out)`` (noise at its
            eval-mode map).
        """
        if m.dim() != 3:
            return super().propagate(m, v)
        mu, var = conv2d_map_moments(
            m, v, self.normalized_weight(), None, self.stride, self.padding, self.dilation,
            self.groups,
        )  # fmt: skip
        return affine_moments(mu, var, self.scale, self.bias, self.noise)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the normalized convolution, noise and affine to ``x`` ``(N, C_in, H, W)``."""
        norms = torch.linalg.vector_norm(self.weight.reshape(self.out_channels, -1), dim=1)
        return normalized_conv2d(
            x, self.weight, 1.0 / norms.clamp_min(NORM_FLOOR), None, self.scale, self.bias,
            self.noise, self.stride, self.padding, self.dilation, self.groups,
        )  # fmt: skip

    def extra_repr(self) -> str:
        """Return the constructor arguments shown by ``repr``."""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.bias is not None}, scale={self.scale is not None}"
        )


class WNLinear(_WNBase):
    """Weight-normalized linear layer: ``x @ (w / ||w||).T [-> noise] * s + b``.

    Args:
        in_features: Input features.
        out_features: Output features.
        bias: Whether to learn the output bias ``b`` (init 0).
        scale: Whether to learn the output scale ``s`` (init 1).
        noise: Optional module applied to the normalized output before the affine.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        scale: bool = True,
        noise: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._init_params((out_features, in_features), bias, scale, noise)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the normalized linear map, noise and affine to ``x`` ``(..., in_features)``.

        Raises:
            ValueError: With a noise module and an input that is not 2-D (noise modules take
                channels in dim 1).
        """
        x_hat = F.linear(x, self.normalized_weight())
        if x_hat.dim() == 2:
            return noise_then_affine(x_hat, self.scale, self.bias, self.noise)
        if self.noise is not None:
            raise ValueError(f"WNLinear with noise needs (N, features) input, got {x.dim()}-D")
        if self.scale is not None:
            x_hat = x_hat * self.scale
        return x_hat + self.bias if self.bias is not None else x_hat

    def extra_repr(self) -> str:
        """Return the constructor arguments shown by ``repr``."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scale={self.scale is not None}"
        )
