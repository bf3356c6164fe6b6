"""Noise modules: the V/U model as layers that sit between a normalization and its affine.

Every noise module derives from :class:`NoiseModule`. It acts on normalized activations
``x_hat`` (``(N, C, ...)``, channels in dim 1) as the ``noise=`` submodule of
:class:`~bnprobe.norms.wn.WNConv2d`, :class:`~bnprobe.norms.an.ANConv2d` or
:class:`~bnprobe.norms.bn.NoisyBatchNorm2d`. Noise is drawn when the module is ``active``:
in training mode, or when ``mc`` is set (Monte Carlo prediction, see
:mod:`bnprobe.noise.samplers`). The modules only hold parameters and call
:mod:`bnprobe.noise.functional`, where the formulas live.
"""

from __future__ import annotations

import abc
from typing import ClassVar, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import functional as NF

__all__ = ["FixedNoise", "LearnedNoise", "NoiseModule"]

_Sigma = Union[float, Sequence[float], Tensor]


def _per_channel(value: _Sigma, channels: int, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.get_default_dtype()).reshape(-1)
    if t.numel() == 1:
        t = t.repeat(channels)
    if t.numel() != channels:
        raise ValueError(f"{name} must be a scalar or have {channels} values, got {t.numel()}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative")
    return t.clone()


class NoiseModule(nn.Module, abc.ABC):
    """Base class of the noise modules.

    Subclasses implement :meth:`forward`, :meth:`affine_coefficients` (the same map as a
    per-sample affine ``x_hat * A + C``, for layers that fold it into a convolution) and
    :meth:`propagate` (moments through the eval-mode map, for analytic normalization).

    Attributes:
        provides_affine: Whether the module replaces the layer's own ``* s + b``.
        channels: Channels ``C``.
        mc: Draw noise also in eval mode (Monte Carlo prediction).
        generator: ``torch.Generator`` of the draws, or None for the default RNG.
    """

    provides_affine: ClassVar[bool] = False

    def __init__(self, channels: int, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.channels = int(channels)
        self.mc = False
        self.generator = generator

    @property
    def active(self) -> bool:
        """Whether forward draws noise (training mode or ``mc``)."""
        return self.training or self.mc

    @abc.abstractmethod
    def forward(self, x_hat: Tensor) -> Tensor:
        """Apply the noise (when active) to ``x_hat``."""

    @abc.abstractmethod
    def affine_coefficients(self, batch: int, ref: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """The map as ``x_hat * A + C``: ``(N, C)`` when active, ``(C,)`` or None otherwise."""

    @abc.abstractmethod
    def propagate(self, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel mean and variance through the eval-mode map."""

    def kl(self) -> Optional[Tensor]:
        """KL divergence of the noise posterior from its prior (None: not variational)."""
        return None


class FixedNoise(NoiseModule):
    """Fixed-variance noise of eq. 7: ``y = (x_hat + V) * U`` (identity in eval mode).

    ``provides_affine`` is False: the layer keeps its own ``* s + b``.

    Args:
        channels: Number of channels ``C``.
        sigma_v: Additive std per channel (``(C,)``) or one value for the layer.
        sigma_u: Multiplicative std, like ``sigma_v``.
        noise_scale: Factor applied to both stds (e.g. to anneal or to ablate the noise).
        generator: Optional ``torch.Generator`` for the draws.

    Attributes:
        sigma_v: Buffer ``(C,)``.
        sigma_u: Buffer ``(C,)``.
        noise_scale: Float multiplier.
    """

    provides_affine = False

    def __init__(
        self,
        channels: int,
        sigma_v: _Sigma = 0.0,
        sigma_u: _Sigma = 0.0,
        noise_scale: float = 1.0,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__(channels, generator)
        self.register_buffer("sigma_v", _per_channel(sigma_v, channels, "sigma_v"))
        self.register_buffer("sigma_u", _per_channel(sigma_u, channels, "sigma_u"))
        self.noise_scale = float(noise_scale)

    def stds(self) -> tuple[Tensor, Tensor]:
        """``(sigma_v, sigma_u)`` times ``noise_scale``, shape ``(C,)``."""
        return self.sigma_v * self.noise_scale, self.sigma_u * self.noise_scale

    def forward(self, x_hat: Tensor) -> Tensor:
        """Apply the noise when active, else return ``x_hat`` unchanged."""
        sv, su = self.stds()
        return NF.fixed_noise(x_hat, sv, su, self.active, self.generator)

    def affine_coefficients(self, batch: int, ref: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """``(U, V U)`` of shape ``(N, C)`` with the draws of :meth:`forward`; None when inactive."""
        sv, su = self.stds()
        return NF.fixed_noise_coefficients(batch, self.channels, sv, su, ref, self.active,
                                           self.generator)

    def propagate(self, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Moments through the eval-mode map (the identity)."""
        return m, v

    def extra_repr(self) -> str:
        """Return the constructor arguments shown by ``repr``."""
        return f"{self.channels}, noise_scale={self.noise_scale}"


class LearnedNoise(NoiseModule):
    """Learned multiplicative noise of eq. 21: ``y = (x_hat + b) * S``, ``S ~ N(s, sigma^2)``.

    ``provides_affine`` is True: it replaces the layer's own affine (build the layer with
    ``scale=False, bias=False``). ``sigma = sigma_param(u)`` with one ``u`` per channel or one
    for the layer. Add ``kl()`` (scaled by ``1 / N_train``) to the loss for the variational
    objective.

    Args:
        channels: Number of channels ``C``.
        init_sigma: Initial ``sigma`` (positive): one value, or one per channel (with
            ``per_channel=False`` their root mean square is used).
        per_channel: One ``sigma`` per channel (else one for the layer).
        prior_std: Std of the prior ``N(1, prior_std^2)`` on ``S``.
        generator: Optional ``torch.Generator`` for the draws.

    Attributes:
        scale: Parameter ``s`` ``(C,)``, init 1.
        bias: Parameter ``b`` ``(C,)``, init 0.
        u: Raw noise parameter ``(C,)`` or ``(1,)``.
    """

    provides_affine = True

    def __init__(
        self,
        channels: int,
        init_sigma: _Sigma = 0.05,
        per_channel: bool = True,
        prior_std: float = 10.0,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__(channels, generator)
        if prior_std <= 0:
            raise ValueError(f"prior_std must be positive, got {prior_std}")
        self.per_channel = per_channel
        self.prior_std = float(prior_std)
        self.scale = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        sigma0 = _per_channel(init_sigma, channels, "init_sigma")
        if not per_channel:
            sigma0 = sigma0.square().mean().sqrt().reshape(1)
        if not bool(torch.isfinite(sigma0).all()) or bool((sigma0 <= 0).any()):
            raise ValueError("init_sigma must be positive and finite")
        self.u = nn.Parameter(NF.sigma_param_inverse(sigma0))

    def sigma(self) -> Tensor:
        """Return the current ``sigma_S``, shape ``(C,)`` or ``(1,)``."""
        return NF.sigma_param(self.u)

    def relative_sigma(self) -> Tensor:
        """Return the geometric mean over channels of ``sigma_S / |s|`` (0-dim tensor).

        Geometric, because ``sigma_S`` is a scale, and because channels that the next layer
        ignores have a flat likelihood: their ``sigma_S`` drifts towards the prior's (10),
        which would dominate an arithmetic mean long before it is reached.
        """
        ratio = self.sigma() / self.scale.abs().clamp_min(1e-12)
        return ratio.clamp_min(torch.finfo(ratio.dtype).tiny).log().mean().exp()

    def kl(self) -> Tensor:
        """Return ``sum_c KL(N(s_c, sigma_c^2) || N(1, prior_std^2))`` (0-dim tensor)."""
        return NF.kl_to_prior(self.scale, self.sigma(), self.prior_std)

    def forward(self, x_hat: Tensor) -> Tensor:
        """Return ``(x_hat + b) * S`` (``S = s`` when not active)."""
        return NF.learned_noise(x_hat, self.scale, self.bias, self.sigma(), self.active,
                                self.generator)

    def affine_coefficients(self, batch: int, ref: Tensor) -> tuple[Tensor, Tensor]:
        """``(S, b S)``: ``(C,)`` when inactive, else ``(N, C)`` with the draws of :meth:`forward`."""
        return NF.learned_noise_coefficients(batch, self.scale, self.bias, self.sigma(), ref,
                                             self.active, self.generator)

    def propagate(self, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Moments through the eval-mode map: ``((m + b) s, v s^2)``."""
        return (m + self.bias) * self.scale, v * self.scale * self.scale

    def extra_repr(self) -> str:
        """Return the constructor arguments shown by ``repr``."""
        return f"{self.channels}, per_channel={self.per_channel}, prior_std={self.prior_std}"
