"""Noise in a network: from a fitted.json to model arguments, and the noise modules of a model.

A model's noise is described by plain, JSON- and ``torch.load(weights_only=True)``-friendly
arguments (stored in checkpoints with the architecture)::

    noise = {"sigma_v": [[...per channel...] per layer], "sigma_u": [[...]], "scale": 1.0,
             "granularity": "layer", "names": [...]}

With learned noise (``learn_noise`` ``layer`` or ``channel``) the same dictionary only gives
the initial ``sigma_S`` (``sigma_u`` times ``scale``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import BnprobeError
from ..options import LearnNoise, NoiseGranularity
from .functional import sigma_param_inverse
from .modules import FixedNoise, LearnedNoise, NoiseModule
from .spec import NoiseSpec

__all__ = [
    "DEFAULT_LEARNED_SIGMA",
    "build_noise_modules",
    "check_noise_layers",
    "kl_total",
    "learned_noise_modules",
    "learned_noise_parameters",
    "noise_kwargs_from_spec",
    "noise_modules",
    "relative_sigmas",
    "set_noise_generator",
    "set_relative_sigma_",
]

#: Initial sigma_S of learned noise when no fitted noise is given.
DEFAULT_LEARNED_SIGMA = 0.05
#: Fitted sigma_u below this start learned noise at this value (sigma_S must be positive).
MIN_LEARNED_SIGMA = 1e-4


def noise_kwargs_from_spec(
    spec: Any, granularity: str | NoiseGranularity = "layer", scale: float = 1.0
) -> dict[str, Any]:
    """Model arguments for the noise of a ``NoiseSpec`` (or the path of a fitted.json).

    Args:
        spec: A :class:`~bnprobe.noise.spec.NoiseSpec` or a path to load one from.
        granularity: ``layer`` (one sigma per layer) or ``channel``.
        scale: Factor applied to the sigmas when the noise is used (``--noise-scale``).

    Returns:
        ``{"sigma_v", "sigma_u", "scale", "granularity", "names"}`` with per-channel lists.

    Raises:
        BnprobeError: For a missing or invalid file, or a bad scale.
    """
    if isinstance(spec, (str, Path)):
        spec = NoiseSpec.load(spec)
    kind = NoiseGranularity.parse(granularity, "noise granularity")
    if not (math.isfinite(scale) and scale >= 0):
        raise BnprobeError(f"--noise-scale must be finite and >= 0, got {scale}")
    pairs = spec.sigmas(per_channel=kind is NoiseGranularity.CHANNEL)
    return {
        "sigma_v": [[float(x) for x in v] for v, _ in pairs],
        "sigma_u": [[float(x) for x in u] for _, u in pairs],
        "scale": float(scale),
        "granularity": kind.value,
        "names": [str(layer.get("name", i)) for i, layer in enumerate(spec.layers)],
    }


def check_noise_layers(noise: dict[str, Any], channels: Sequence[int], where: str = "noise") -> None:
    """Check noise arguments against the channels of a network's normalized layers.

    Args:
        noise: Arguments as made by :func:`noise_kwargs_from_spec`.
        channels: Output channels of each normalized layer, in order.
        where: What to call the noise in messages.

    Raises:
        BnprobeError: On a different layer count, channel count, or a negative or
            non-finite sigma.
    """
    try:
        sv, su = noise["sigma_v"], noise["sigma_u"]
    except (KeyError, TypeError) as exc:
        raise BnprobeError(f"{where}: needs 'sigma_v' and 'sigma_u' lists") from exc
    names = list(noise.get("names") or [str(i) for i in range(len(sv))])
    if len(sv) != len(channels) or len(su) != len(channels):
        raise BnprobeError(
            f"{where} has {len(sv)} layers but the network has {len(channels)} normalized layers"
        )
    for i, (v, u, c) in enumerate(zip(sv, su, channels)):
        name = names[i] if i < len(names) else str(i)
        if len(v) != c or len(u) != c:
            raise BnprobeError(
                f"{where} layer {i} ({name}) has {len(v)} channels but the network's normalized "
                f"layer {i} has {c}"
            )
        bad = [x for x in (*v, *u) if not (isinstance(x, (int, float)) and math.isfinite(x) and x >= 0)]
        if bad:
            raise BnprobeError(f"{where} layer {i} ({name}): sigma {bad[0]!r} is negative or not finite")
    scale = noise.get("scale", 1.0)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
        raise BnprobeError(f"{where}: scale {scale!r} must be finite and >= 0")


def build_noise_modules(
    channels: Sequence[int],
    noise: Optional[dict[str, Any]] = None,
    learn_noise: str | LearnNoise = "off",
    prior_std: float = 10.0,
) -> list[Optional[nn.Module]]:
    """One noise module per normalized layer (or None everywhere).

    Args:
        channels: Output channels of each normalized layer.
        noise: Fixed noise arguments, or the initial sigma_S of learned noise (its
            ``sigma_u`` times its ``scale``, at least ``MIN_LEARNED_SIGMA``).
        learn_noise: ``off`` (fixed noise from ``noise``, if any), ``layer`` or ``channel``.
        prior_std: Prior std of learned noise.

    Returns:
        A list with one module or None per layer.

    Raises:
        BnprobeError: For noise arguments that do not fit ``channels``, or a bad prior.
    """
    mode = LearnNoise.parse(learn_noise, "learn-noise")
    if noise is not None:
        check_noise_layers(noise, channels)
    if mode is LearnNoise.OFF:
        if noise is None:
            return [None] * len(channels)
        scale = float(noise.get("scale", 1.0))
        return [FixedNoise(c, v, u, noise_scale=scale)
                for c, v, u in zip(channels, noise["sigma_v"], noise["sigma_u"])]
    if not (math.isfinite(prior_std) and prior_std > 0):
        raise BnprobeError(f"--prior-std must be positive, got {prior_std}")
    modules: list[Optional[nn.Module]] = []
    scale = 1.0 if noise is None else float(noise.get("scale", 1.0))
    for i, c in enumerate(channels):
        init: Any = DEFAULT_LEARNED_SIGMA
        if noise is not None:
            init = [max(float(x) * scale, MIN_LEARNED_SIGMA) for x in noise["sigma_u"][i]]
        modules.append(LearnedNoise(c, init_sigma=init, per_channel=mode is LearnNoise.CHANNEL,
                                    prior_std=prior_std))
    return modules


def noise_modules(model: nn.Module) -> list[nn.Module]:
    """Every noise module (:class:`~bnprobe.noise.modules.NoiseModule`) of a model, in order."""
    return [m for m in model.modules() if isinstance(m, NoiseModule)]


def learned_noise_modules(model: nn.Module) -> list[LearnedNoise]:
    """Every ``LearnedNoise`` module of a model, in order."""
    return [m for m in model.modules() if isinstance(m, LearnedNoise)]


def learned_noise_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The variational parameters of learned noise: ``u`` (sigma_S) and ``s`` of every layer.

    These are the parameters the KL term acts on; training gives them an optimizer parameter
    group of their own (see :func:`bnprobe.training.setup.make_optimizer`). The bias ``b``
    of a ``LearnedNoise`` is an ordinary parameter and not included.
    """
    return [p for m in learned_noise_modules(model) for p in (m.u, m.scale) if p.requires_grad]


@torch.no_grad()
def set_relative_sigma_(model: nn.Module, ratio: float) -> int:
    """Set ``sigma_S = ratio * |s|`` in every channel of every learned noise layer.

    Args:
        model: The model.
        ratio: The relative noise level (positive).

    Returns:
        The number of learned noise layers.

    Raises:
        ValueError: For a ratio that is not positive and finite.
    """
    if not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"relative sigma must be positive, got {ratio}")
    layers = learned_noise_modules(model)
    for m in layers:
        scale = m.scale.detach().abs()
        sigma = ratio * (scale if m.per_channel else scale.mean().reshape(1))
        m.u.copy_(sigma_param_inverse(sigma.clamp_min(torch.finfo(sigma.dtype).tiny)))
    return len(layers)


def kl_total(model: nn.Module) -> Optional[Tensor]:
    """Sum of ``KL(q(S) || p(S))`` over the learned noise layers (None without any)."""
    layers = learned_noise_modules(model)
    if not layers:
        return None
    return torch.stack([m.kl() for m in layers]).sum()


@torch.no_grad()
def relative_sigmas(model: nn.Module) -> list[float]:
    """Geometric mean over channels of ``sigma_S / |s|`` of each learned noise layer, in order."""
    return [float(m.relative_sigma()) for m in learned_noise_modules(model)]


def set_noise_generator(
    model: nn.Module, generator: Optional[torch.Generator]
) -> list[Optional[torch.Generator]]:
    """Make every noise module draw from ``generator``; returns the previous generators."""
    modules = noise_modules(model)
    previous = [m.generator for m in modules]
    for m in modules:
        m.generator = generator
    return previous
