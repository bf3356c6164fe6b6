"""The V/U noise model as functions: the only place its formulas live.

Training-time BN is ``((x - mu) / sigma + V) * U`` (paper eq. 7). bnprobe injects the same
noise after a deterministic normalization: ``y = (x_hat + V) * U`` with ``V ~ N(0, sigma_v^2)``
and ``U ~ N(1, sigma_u^2)`` drawn once per sample and channel and shared by all spatial
positions (:func:`fixed_noise`). Learned noise (eq. 21) is ``y = (x_hat + b) * S`` with
``S ~ N(s, sigma_S^2)`` per sample and channel (:func:`learned_noise`), and
``sigma_S = sigma_param(u)``.

As in torchvision's ``stochastic_depth``, every function takes ``training``: when False it is
the deterministic (eval-mode) map. Draws use ``generator`` (None: the default RNG) on the
input's device and dtype; a generator on another device draws there and the values are moved.
The ``*_coefficients`` variants return the same draws as a per-sample affine map
``x_hat * A + C``, so layers can fold the noise into a convolution.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

__all__ = [
    "bcast",
    "fixed_noise",
    "fixed_noise_coefficients",
    "kl_to_prior",
    "learned_noise",
    "learned_noise_coefficients",
    "noise_then_affine",
    "sigma_param",
    "sigma_param_inverse",
    "standard_normal",
]

_Std = Union[float, Tensor]


def bcast(param: _Std, x: Tensor) -> _Std:
    """Reshape a per-channel tensor ``(C,)``, ``(1,)`` or ``(N, C)`` to broadcast against ``x``.

    Args:
        param: A float (returned as is) or a tensor of per-channel (or per-sample and
            channel) values.
        x: Activations ``(N, C, ...)``.

    Returns:
        ``param`` shaped ``(1, C, 1, ...)`` (or ``(N, C, 1, ...)`` for a 2-d ``param``).
    """
    if not isinstance(param, Tensor):
        return float(param)
    lead = tuple(param.shape) if param.dim() == 2 else (1, -1)
    return param.reshape(lead + (1,) * (x.dim() - 2))


def standard_normal(
    batch: int, channels: int, ref: Tensor, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Standard normal draws of shape ``(batch, channels)`` on ``ref``'s device and dtype.

    Args:
        batch: Samples ``N``.
        channels: Channels ``C``.
        ref: A tensor giving the device and dtype.
        generator: Optional generator (the default RNG when None).

    Returns:
        The draws.
    """
    shape = (batch, channels)
    if generator is None or generator.device == ref.device:
        return torch.randn(shape, generator=generator, device=ref.device, dtype=ref.dtype)
    z = torch.randn(shape, generator=generator, device=generator.device, dtype=ref.dtype)
    return z.to(ref.device)


def _check(x: Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"noise expects input of shape (N, C, ...), got {tuple(x.shape)}")


def _per_channel(value: _Std, ref: Tensor) -> _Std:
    if isinstance(value, Tensor):
        return value.to(device=ref.device, dtype=ref.dtype)
    return float(value)


def _draw_vu(
    batch: int, channels: int, sigma_v: _Std, sigma_u: _Std, ref: Tensor,
    generator: Optional[torch.Generator],
) -> tuple[Tensor, Tensor]:
    # V first, then U: one value per sample and channel
    v = standard_normal(batch, channels, ref, generator) * _per_channel(sigma_v, ref)
    u = 1.0 + standard_normal(batch, channels, ref, generator) * _per_channel(sigma_u, ref)
    return v, u


def fixed_noise_coefficients(
    batch: int,
    channels: int,
    sigma_v: _Std,
    sigma_u: _Std,
    ref: Tensor,
    training: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Optional[tuple[Tensor, Tensor]]:
    """:func:`fixed_noise` as a per-sample affine map: ``(A, C) = (U, V * U)``.

    ``(x_hat + V) * U = x_hat * U + V * U``, with the draws :func:`fixed_noise` makes for an
    input with ``batch`` samples and ``channels`` channels.

    Args:
        batch: Samples ``N``.
        channels: Channels ``C``.
        sigma_v: Std of ``V``: a float or a tensor ``(C,)`` / ``(1,)``.
        sigma_u: Std of ``U``, like ``sigma_v``.
        ref: A tensor giving the device and dtype of the draws.
        training: Draw noise; when False return None (the identity map).
        generator: Optional generator.

    Returns:
        ``(A, C)`` of shape ``(N, C)``, or None.
    """
    if not training:
        return None
    v, u = _draw_vu(batch, channels, sigma_v, sigma_u, ref, generator)
    return u, v * u


def fixed_noise(
    x_hat: Tensor,
    sigma_v: _Std,
    sigma_u: _Std,
    training: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """BN-like noise: ``(x_hat + V) * U``, ``V ~ N(0, sigma_v^2)``, ``U ~ N(1, sigma_u^2)``.

    Args:
        x_hat: Normalized activations ``(N, C, ...)``.
        sigma_v: Std of ``V``: a float or a tensor ``(C,)`` / ``(1,)``.
        sigma_u: Std of ``U``, like ``sigma_v``.
        training: Apply the noise; when False return ``x_hat`` unchanged.
        generator: Optional generator.

    Returns:
        The noisy activations.
    """
    _check(x_hat)
    if not training:
        return x_hat
    v, u = _draw_vu(x_hat.shape[0], x_hat.shape[1], sigma_v, sigma_u, x_hat, generator)
    return (x_hat + bcast(v, x_hat)) * bcast(u, x_hat)


def learned_noise_coefficients(
    batch: int,
    scale: Tensor,
    bias: Tensor,
    sigma: Tensor,
    ref: Tensor,
    training: bool = True,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """:func:`learned_noise` as an affine map: ``(A, C) = (S, b * S)``.

    Args:
        batch: Samples ``N``.
        scale: Mean ``s`` of ``S``, ``(C,)``.
        bias: Shift ``b``, ``(C,)``.
        sigma: Std ``sigma_S``, ``(C,)`` or ``(1,)``.
        ref: A tensor giving the device and dtype of the draws.
        training: Draw ``S``; when False ``S = s``.
        generator: Optional generator.

    Returns:
        ``(A, C)``: shape ``(C,)`` when not training, else ``(N, C)`` with the draws
        :func:`learned_noise` makes for ``batch`` samples.
    """
    if not training:
        return scale, bias * scale
    s = scale + standard_normal(batch, scale.shape[0], ref, generator) * sigma
    return s, bias * s


def learned_noise(
    x_hat: Tensor,
    scale: Tensor,
    bias: Tensor,
    sigma: Tensor,
    training: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Learned multiplicative noise: ``(x_hat + b) * S``, ``S = s + sigma * eps`` per sample.

    Reparametrized, so ``s``, ``b`` and ``sigma`` all get gradients.

    Args:
        x_hat: Normalized activations ``(N, C, ...)``.
        scale: Mean ``s`` of ``S``, ``(C,)``.
        bias: Shift ``b``, ``(C,)``.
        sigma: Std ``sigma_S``, ``(C,)`` or ``(1,)``.
        training: Draw ``S``; when False ``S = s``.
        generator: Optional generator.

    Returns:
        The output activations.
    """
    _check(x_hat)
    shifted = x_hat + bcast(bias, x_hat)
    if not training:
        return shifted * bcast(scale, x_hat)
    eps = standard_normal(x_hat.shape[0], x_hat.shape[1], x_hat, generator)
    return shifted * (bcast(scale, x_hat) + eps.reshape(eps.shape + (1,) * (x_hat.dim() - 2))
                      * bcast(sigma, x_hat))


def noise_then_affine(
    x_hat: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], noise: Optional[nn.Module]
) -> Tensor:
    """Apply the optional noise module, then ``* scale + bias`` per channel (dim 1).

    This is where the noise sits in every normalized layer: between the normalization and
    its affine.

    Args:
        x_hat: Normalized activations ``(N, C, ...)``.
        scale: Per-channel scale ``(C,)`` or None.
        bias: Per-channel bias ``(C,)`` or None.
        noise: Module (or function) applied to ``x_hat`` first, or None.

    Returns:
        The transformed activations.
    """
    if noise is not None:
        x_hat = noise(x_hat)
    if scale is not None:
        x_hat = x_hat * bcast(scale, x_hat)
    if bias is not None:
        x_hat = x_hat + bcast(bias, x_hat)
    return x_hat


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


def sigma_param_inverse(sigma: _Std) -> _Std:
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


def kl_to_prior(scale: Tensor, sigma: Tensor, prior_std: float) -> Tensor:
    """``sum_c KL(N(s_c, sigma_c^2) || N(1, prior_std^2))`` (0-dim tensor).

    Args:
        scale: Posterior means ``s`` ``(C,)``.
        sigma: Posterior stds, ``(C,)`` or ``(1,)`` (broadcast over channels).
        prior_std: Std ``p`` of the prior.

    Returns:
        The KL divergence summed over channels.
    """
    sigma = sigma.expand(scale.shape)
    p = float(prior_std)
    terms = math.log(p) - torch.log(sigma) + (sigma**2 + (scale - 1.0) ** 2) / (2.0 * p * p) - 0.5
    return terms.sum()
