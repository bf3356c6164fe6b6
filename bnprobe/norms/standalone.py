"""Normalizations without a weight: for a BN layer whose input is not a conv's own output.

A BN layer after a concatenation (DenseNet's pre-activation ``BN -> ReLU -> conv``), an
addition or a shared conv has no weight to normalize, so :mod:`bnprobe.norms.convert` replaces
it by one of these batch-independent layers, both written like every normalized layer as
``x_hat [-> noise] * s + b`` with ``x_hat`` standardized per channel (dim 1):

* :class:`FixedNorm` (``wn`` and ``none``): ``x_hat = (x - mean) / sqrt(var + eps)`` with fixed
  buffers: the BN's population statistics, or the batch statistics of the data-dependent init
  (:func:`bnprobe.norms.init.data_dependent_init_`) -- BN in evaluation mode.
* :class:`ANNorm` (``an``): ``x_hat = (x - m) / sqrt(v + eps)`` with ``(m, v)`` the input's
  analytic channel moments (for a moment map: the mixture over its positions, what BN would
  measure), stored by :meth:`ANNorm.propagate` before each forward, like
  :class:`~bnprobe.norms.an.ANConv2d`; gradients reach upstream parameters through them.

Both ``propagate`` methods take channel vectors ``(C,)`` or moment maps ``(H, W, C)`` (see
:mod:`bnprobe.norms.moment_maps`) and return the same kind.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..noise.functional import bcast, noise_then_affine
from .an import state_with_detached_moments
from .moment_maps import channel_moments
from .wn import affine_moments

__all__ = ["ANNorm", "FixedNorm"]


class _ChannelNorm(nn.Module):
    """Shared parts: ``scale`` s (init 1), ``bias`` b (init 0), ``noise``, ``eps``."""

    channelwise = True  # a per-channel map: moment propagation keeps the spatial correlation

    def __init__(
        self, channels: int, eps: float, bias: bool, scale: bool, noise: Optional[nn.Module]
    ) -> None:
        super().__init__()
        self.channels = int(channels)
        self.eps = float(eps)
        self.scale = nn.Parameter(torch.ones(channels)) if scale else None
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.register_module("noise", noise)

    def _check(self, name: str, t: Tensor, maps: bool = False) -> None:
        if t.dim() not in ((1, 3) if maps else (1,)) or t.shape[-1] != self.channels:
            shapes = f"({self.channels},)" + (f" or (H, W, {self.channels})" if maps else "")
            raise ValueError(f"{type(self).__name__}: {name} must have shape {shapes}, got {tuple(t.shape)}")

    def _output_moments(self, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return affine_moments(m, v, self.scale, self.bias, self.noise)

    def extra_repr(self) -> str:
        """Return the constructor arguments shown by ``repr``."""
        return (f"{self.channels}, eps={self.eps}, bias={self.bias is not None}, "
                f"scale={self.scale is not None}")


class FixedNorm(_ChannelNorm):
    """Normalization by fixed statistics: ``(x - mean) / sqrt(var + eps) [-> noise] * s + b``.

    Args:
        channels: Channels (dim 1 of the input).
        eps: Added to ``var``.
        bias: Whether to learn ``b``.
        scale: Whether to learn ``s`` (without ``s`` and ``b``, e.g. when a ``LearnedNoise``
            provides the affine).
        noise: Optional noise module applied to ``x_hat``.

    Attributes:
        mean: Buffer ``(C,)`` (init 0).
        var: Buffer ``(C,)`` (init 1).
    """

    def __init__(
        self,
        channels: int,
        eps: float = 1e-5,
        bias: bool = True,
        scale: bool = True,
        noise: Optional[nn.Module] = None,
    ) -> None:
        super().__init__(channels, eps, bias, scale, noise)
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))

    @torch.no_grad()
    def set_statistics_(self, mean: Tensor, var: Tensor) -> None:
        """Copy new statistics into the buffers.

        Args:
            mean: Channel means ``(C,)``.
            var: Channel variances ``(C,)``.
        """
        self._check("mean", mean)
        self._check("var", var)
        self.mean.copy_(mean)
        self.var.copy_(var)

    def forward(self, x: Tensor) -> Tensor:
        """Standardize ``x`` ``(N, C, ...)`` by the buffers, then noise and affine."""
        inv = (self.var + self.eps).rsqrt()
        x_hat = x * bcast(inv, x) - bcast(self.mean * inv, x)
        return noise_then_affine(x_hat, self.scale, self.bias, self.noise)

    def propagate(self, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Output moments for input moments ``(m, v)``, ``(C,)`` or maps ``(H, W, C)``.

        The noise module contributes its eval-mode map.
        """
        inv = (self.var + self.eps).rsqrt()
        return self._output_moments((m - self.mean) * inv, v * inv * inv)


class ANNorm(_ChannelNorm):
    """Analytic normalization of a tensor: ``(x - m) / sqrt(v + eps) [-> noise] * s + b``.

    ``(m, v)`` are the analytic channel moments of the input, stored by :meth:`propagate`
    (called by the model's moment propagation before every forward, see
    :mod:`bnprobe.norms.an`); they keep their autograd graph.

    Args:
        channels: Channels (dim 1 of the input).
        eps: Added to the predicted variance.
        bias: Whether to learn ``b``.
        scale: Whether to learn ``s``.
        noise: Optional noise module applied to ``x_hat``.
    """

    def __init__(
        self,
        channels: int,
        eps: float = 1e-5,
        bias: bool = True,
        scale: bool = True,
        noise: Optional[nn.Module] = None,
    ) -> None:
        super().__init__(channels, eps, bias, scale, noise)
        self._m_in: Optional[Tensor] = None
        self._v_in: Optional[Tensor] = None

    def propagate(self, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the input's channel moments; return the output's.

        For channel vectors ``x_hat`` has moments ``(0, 1)``; for a moment map it has the map
        ``((m_p - mu) / sigma, v_p / sigma^2)`` with ``(mu, sigma^2 - eps)`` the mixture over
        positions. Either goes through the noise's eval-mode map and the affine.

        Args:
            m: Input means ``(C,)`` or ``(H, W, C)``.
            v: Input variances, same shape.

        Returns:
            ``(mean, var)`` of the same shape.
        """
        self._check("m", m, maps=True)
        self._check("v", v, maps=True)
        mu, var = channel_moments(m, v)
        self._m_in, self._v_in = mu, var
        if m.dim() == 3:
            inv = (var + self.eps).rsqrt()
            return self._output_moments((m - mu) * inv, v * inv * inv)
        zeros = mu.new_zeros(self.channels) if self.scale is None else self.scale.new_zeros(self.channels)
        return self._output_moments(zeros, zeros + 1.0)

    def forward(self, x: Tensor) -> Tensor:
        """Standardize ``x`` ``(N, C, ...)`` by the stored moments, then noise and affine.

        Raises:
            RuntimeError: If no moments were propagated.
        """
        if self._m_in is None or self._v_in is None:
            raise RuntimeError("ANNorm needs input moments: call propagate(m, v) before forward")
        m = self._m_in.to(x.dtype)
        inv = (self._v_in.to(x.dtype) + self.eps).rsqrt()
        x_hat = x * bcast(inv, x) - bcast(m * inv, x)
        return noise_then_affine(x_hat, self.scale, self.bias, self.noise)

    def __getstate__(self) -> dict[str, Any]:
        return state_with_detached_moments(self)
