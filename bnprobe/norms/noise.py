"""Noise injected after a normalization (paper eqs. 7 and 21).

The noise modules act on the normalized activations ``x_hat`` (shape ``(N, C, ...)``, channels
in dim 1) and sit BETWEEN the normalization and the affine ``* s + b``: either as the
``noise=`` submodule of :class:`~bnprobe.norms.wn.WNConv2d` / :class:`~bnprobe.norms.an.ANConv2d`
(applied before their affine), or in a sequence ``normalization(affine=False) -> noise ->``
:class:`ChannelAffine`. :class:`LearnedNoise` brings its own ``s`` and ``b``, so it replaces the
affine (use ``scale=False, bias=False`` on the layer before it).

One random value is drawn per sample and channel and shared by all spatial positions. Noise is
active when ``module.training`` is True or ``module.mc`` is True (Monte-Carlo prediction) and
off in eval mode. Draws use ``module.generator`` (a ``torch.Generator``; None: the default RNG)
and are made on the input's device and dtype (on the generator's device, then moved, when the
generator lives on another device).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = [
    "ChannelAffine",
    "FixedNoise",
    "LearnedNoise",
    "apply_fixed_noise",
    "channel_noise",
    "sigma_param",
    "sigma_param_inverse",
]

_Sigma = Union[float, Sequence[float], Tensor]


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    if x.dim() < 2:
        raise ValueError(f"noise expects input of shape (N, C, ...), got {tuple(x.shape)}")
    return (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)


def _bcast(param: Union[float, Tensor], x: Tensor) -> Union[float, Tensor]:
    """Reshape a per-channel tensor ``(C,)`` or ``(1,)`` to broadcast over dim 1 of ``x``."""
    if not isinstance(param, Tensor):
        return float(param)
    return param.reshape((1, -1) + (1,) * (x.dim() - 2))


def channel_noise(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Standard normal draws of shape ``(N, C, 1, ..., 1)``: one per sample and channel.

    Args:
        x: Activations ``(N, C, ...)``; the draws follow its device and dtype.
        generator: Optional generator (the default RNG when None).

    Returns:
        The draws, broadcastable against ``x``.
    """
    shape = _channel_shape(x)
    if generator is None or generator.device == x.device:
        return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
    z = torch.randn(shape, generator=generator, device=generator.device, dtype=x.dtype)
    return z.to(x.device)


def _draw(shape: tuple[int, ...], ref: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Standard normal draws of ``shape`` on ``ref``'s device and dtype (like channel_noise)."""
    if generator is None or generator.device == ref.device:
        return torch.randn(shape, generator=generator, device=ref.device, dtype=ref.dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=ref.dtype).to(
        ref.device
    )


def apply_fixed_noise(
    x_hat: Tensor,
    sigma_v: Union[float, Tensor],
    sigma_u: Union[float, Tensor],
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Return ``(x_hat + V) * U`` with ``V ~ N(0, sigma_v^2)`` and ``U ~ N(1, sigma_u^2)``.

    ``V`` and ``U`` are drawn once per sample and channel (V first, then U) and shared over
    the spatial positions.

    Args:
        x_hat: Normalized activations ``(N, C, ...)``.
        sigma_v: Additive noise std: a float, or a tensor ``(C,)`` or ``(1,)``.
        sigma_u: Multiplicative noise std, like ``sigma_v``.
        generator: Optional generator.

    Returns:
        The noisy activations.
    """
    v = channel_noise(x_hat, generator) * _bcast(sigma_v, x_hat)
    u = 1.0 + channel_noise(x_hat, generator) * _bcast(sigma_u, x_hat)
    return (x_hat + v) * u


def _per_channel(value: _Sigma, channels: int, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.get_default_dtype()).reshape(-1)
    if t.numel() == 1:
        t = t.repeat(channels)
    if t.numel() != channels:
        raise ValueError(f"{name} must be a scalar or have {channels} values, got {t.numel()}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative")
    return t.clone()


class FixedNoise(nn.Module):
    """Fixed-variance noise of eq. 7: ``y = (x_hat + V) * U`` (identity in eval mode).

    ``provides_affine`` is False: the layer before it keeps its own ``* s + b``.

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
        mc: Draw noise also in eval mode (Monte-Carlo prediction).
        generator: The generator or None.
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
        super().__init__()
        self.channels = channels
        self.register_buffer("sigma_v", _per_channel(sigma_v, channels, "sigma_v"))
        self.register_buffer("sigma_u", _per_channel(sigma_u, channels, "sigma_u"))
        self.noise_scale = float(noise_scale)
        self.mc = False
        self.generator = generator

    @property
    def active(self) -> bool:
        """Whether forward draws noise (training mode or ``mc``)."""
        return self.training or self.mc

    def forward(self, x_hat: Tensor) -> Tensor:
        """Apply the noise when active, else return ``x_hat`` unchanged."""
        if not self.active:
            return x_hat
        sv = (self.sigma_v * self.noise_scale).to(x_hat.dtype)
        su = (self.sigma_u * self.noise_scale).to(x_hat.dtype)
        return apply_fixed_noise(x_hat, sv, su, self.generator)

    def affine_coefficients(self, batch: int, ref: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """The noise as a per-sample, per-channel affine map ``x_hat * A + C``.

        ``(x_hat + V) U = x_hat U + V U``; the draws are the same (V then U, one per sample
        and channel) as :meth:`forward` makes for an input with ``batch`` samples.

        Args:
            batch: Number of samples ``N``.
            ref: A tensor giving the device and dtype of the draws.

        Returns:
            ``(A, C)`` of shape ``(N, C)``, or None when inactive (the identity).
        """
        if not self.active:
            return None
        sv = (self.sigma_v * self.noise_scale).to(device=ref.device, dtype=ref.dtype)
        su = (self.sigma_u * self.noise_scale).to(device=ref.device, dtype=ref.dtype)
        v = _draw((batch, self.channels), ref, self.generator) * sv
        u = 1.0 + _draw((batch, self.channels), ref, self.generator) * su
        return u, v * u

    def propagate(self, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Moments through the eval-mode map (the identity)."""
        return m, v

    def extra_repr(self) -> str:
        """Return the constructor arguments shown by ``repr``."""
        return f"{self.channels}, noise_scale={self.noise_scale}"


def sigma_param(u: Tensor) -> Tensor:
    """Map an unconstrained ``u`` to a positive std: ``exp(u)`` for ``u < 0``, ``u + 1`` else.

    Continuous with a continuous derivative at 0 (both sides give value 1 and slope 1); the
    slope is ``exp(u) <= 1`` below 0 and 1 above, so it never explodes. The exponential branch
    is evaluated at ``min(u, 0)`` so the unused branch cannot overflow into NaN gradients.

    Args:
        u: Raw parameter tensor.

    Returns:
        ``sigma``, same shape.
    """
    return torch.where(u < 0, torch.exp(u.clamp(max=0.0)), u + 1.0)


def sigma_param_inverse(sigma: Union[float, Tensor]) -> Union[float, Tensor]:
    """Inverse of :func:`sigma_param`: ``log(sigma)`` for ``sigma < 1``, ``sigma - 1`` else.

    Args:
        sigma: Positive std (float or tensor).

    Returns:
        ``u`` of the same kind (float for a float).

    Raises:
        ValueError: If some ``sigma`` is not positive.
    """
    if isinstance(sigma, Tensor):
        if bool((sigma <= 0).any()):
            raise ValueError("sigma_param_inverse: sigma must be positive")
        return torch.where(sigma < 1, torch.log(sigma.clamp(max=1.0)), sigma - 1.0)
    sigma = float(sigma)
    if not sigma > 0:
        raise ValueError(f"sigma_param_inverse: sigma must be positive, got {sigma}")
    return math.log(sigma) if sigma < 1 else sigma - 1.0


class LearnedNoise(nn.Module):
    """Learned multiplicative noise of eq. 21: ``y = (x_hat + b) * S``, ``S ~ N(s, sigma^2)``.

    ``provides_affine`` is True: it replaces the layer's own affine (build the layer with
    ``scale=False, bias=False``).

    ``S`` is drawn per sample and channel by reparametrization (``S = s + sigma * eps``), so
    ``s``, ``b`` and ``sigma`` all get gradients. In eval mode (``mc`` False) ``S = s``.
    ``sigma = sigma_param(u)`` with one ``u`` per channel or one for the layer. Add ``kl()``
    (scaled by ``1 / N_train``) to the loss for the variational objective.

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
        mc: Draw noise also in eval mode.
        generator: The generator or None.
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
        super().__init__()
        if prior_std <= 0:
            raise ValueError(f"prior_std must be positive, got {prior_std}")
        self.channels = channels
        self.per_channel = per_channel
        self.prior_std = float(prior_std)
        self.scale = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        sigma0 = _per_channel(init_sigma, channels, "init_sigma")
        if not per_channel:
            sigma0 = sigma0.square().mean().sqrt().reshape(1)
        if not bool(torch.isfinite(sigma0).all()) or bool((sigma0 <= 0).any()):
            raise ValueError("init_sigma must be positive and finite")
        self.u = nn.Parameter(sigma_param_inverse(sigma0))
        self.mc = False
        self.generator = generator

    @property
    def active(self) -> bool:
        """Whether forward draws noise (training mode or ``mc``)."""
        return self.training or self.mc

    def sigma(self) -> Tensor:
        """Return the current ``sigma_S``, shape ``(C,)`` or ``(1,)``."""
        return sigma_param(self.u)

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
        sigma = self.sigma().expand(self.channels)
        p = self.prior_std
        terms = (
            math.log(p)
            - torch.log(sigma)
            + (sigma**2 + (self.scale - 1.0) ** 2) / (2.0 * p * p)
            - 0.5
        )
        return terms.sum()

    def forward(self, x_hat: Tensor) -> Tensor:
        """Return ``(x_hat + b) * S`` (``S = s`` when not active)."""
        shifted = x_hat + _bcast(self.bias, x_hat)
        s = _bcast(self.scale, x_hat)
        if not self.active:
            return shifted * s
        noise = channel_noise(x_hat, self.generator) * _bcast(self.sigma(), x_hat)
        return shifted * (s + noise)

    def affine_coefficients(self, batch: int, ref: Tensor) -> tuple[Tensor, Tensor]:
        """The map ``(x_hat + b) S`` as ``x_hat * A + C`` with ``A = S``, ``C = b S``.

        Args:
            batch: Number of samples ``N``.
            ref: A tensor giving the device and dtype of the draws.

        Returns:
            ``(A, C)`` of shape ``(C,)`` when inactive (``S = s``), else ``(N, C)`` with the
            same draws as :meth:`forward` makes for ``batch`` samples.
        """
        if not self.active:
            return self.scale, self.bias * self.scale
        z = _draw((batch, self.channels), ref, self.generator)
        s = self.scale + z * self.sigma()
        return s, self.bias * s

    def propagate(self, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Moments through the eval-mode map: ``((m + b) s, v s^2)``."""
        return (m + self.bias) * self.scale, v * self.scale * self.scale

    def extra_repr(self) -> str:
        """Return the constructor arguments shown by ``repr``."""
        return f"{self.channels}, per_channel={self.per_channel}, prior_std={self.prior_std}"


class ChannelAffine(nn.Module):
    """Per-channel affine ``y = x * s + b`` (dim 1), to put after a noise module.

    Args:
        channels: Number of channels.
        bias: Whether to learn ``b`` (init 0).
        scale: Whether to learn ``s`` (init 1).
    """

    def __init__(self, channels: int, bias: bool = True, scale: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.scale = nn.Parameter(torch.ones(channels)) if scale else None
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x * s + b``."""
        if self.scale is not None:
            x = x * _bcast(self.scale, x)
        if self.bias is not None:
            x = x + _bcast(self.bias, x)
        return x

    def propagate(self, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Moments through the affine: ``(m s + b, v s^2)``."""
        if self.scale is not None:
            m, v = m * self.scale, v * self.scale * self.scale
        if self.bias is not None:
            m = m + self.bias
        return m, v

    def extra_repr(self) -> str:
        """Return the constructor arguments shown by ``repr``."""
        return f"{self.channels}, bias={self.bias is not None}, scale={self.scale is not None}"
