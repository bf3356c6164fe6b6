"""Initialization from data: data-dependent affine init (none, wn) and AN input moments."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..noise import LearnedNoise, sigma_param_inverse
from .an import ANConv2d, InputMoments, dataset_channel_moments
from .block import ConvNorm
from .spatial import lag_covariance
from .standalone import FixedNorm
from .wn import _WNBase

__all__ = ["DDI_BATCH", "data_dependent_init_", "init_input_moments_"]

#: Batch size of the data-dependent initialization pass.
DDI_BATCH = 128


def _ddi_target(block: nn.Module) -> bool:
    if isinstance(block, _WNBase):  # WNConv2d, WNLinear (in a ConvNorm or not), not AN
        return not isinstance(block, ANConv2d)
    if not isinstance(block, ConvNorm):
        return False
    conv = block.conv
    return (isinstance(conv, (nn.Conv2d, nn.Linear)) and conv.bias is not None
            and isinstance(block.norm, nn.Identity))


def _standardize_(block: nn.Module, mean: Tensor, std: Tensor) -> None:
    """Change the block's output ``y`` to ``(y - mean) / std`` by adjusting its parameters."""
    conv = block.conv if isinstance(block, ConvNorm) else block
    if isinstance(conv, (nn.Conv2d, nn.Linear)):  # none: y = w.x + c
        conv.weight.div_(std.reshape((-1,) + (1,) * (conv.weight.dim() - 1)))
        conv.bias.sub_(mean).div_(std)
        return
    if conv.scale is not None:  # wn: y = x_hat * s + b (noise off)
        conv.scale.div_(std)
        if conv.bias is not None:
            conv.bias.sub_(mean).div_(std)
        else:
            raise ValueError("data-dependent init needs a bias on every WN layer")
        return
    noise = conv.noise
    if not isinstance(noise, LearnedNoise):
        raise ValueError(f"cannot initialize a WN layer without affine and noise {type(noise).__name__}")
    # y = (x_hat + b) * s: s -> s / std, b -> b - mean / s; sigma_S keeps its ratio to s
    noise.bias.sub_(mean / noise.scale)
    noise.scale.div_(std)
    sigma = noise.sigma() / (std if noise.per_channel else std.mean().reshape(1))
    noise.u.copy_(sigma_param_inverse(sigma.clamp_min(torch.finfo(sigma.dtype).tiny)))


@torch.no_grad()
def data_dependent_init_(model: nn.Module, x: Tensor, eps: float = 1e-5) -> int:
    """Data-dependent init of the affine of ``none`` and ``wn`` layers (a BN pass at lr 0).

    One forward pass over ``x`` (e.g. 128 training images) in evaluation mode (noise off).
    Each ``ConvNorm`` block with a plain biased conv/linear (``none``) and each ``WNConv2d``
    or ``WNLinear`` (``wn``) gets the scale and bias that BN would apply in that pass: its
    output ``y`` is replaced by ``(y - mean) / sqrt(var + eps)`` with the batch statistics per
    channel, so later layers see standardized inputs (Salimans & Kingma 2016). For ``none``
    the conv weight and bias are rescaled; for ``wn`` the scale ``s`` and bias ``b`` (or a
    ``LearnedNoise``'s ``s``, ``b`` and ``sigma_S``, keeping ``sigma_S / s``). Each
    :class:`~bnprobe.norms.standalone.FixedNorm` (a converted BN without a conv of its own)
    takes the batch statistics of its input as its ``mean`` and ``var``, like BN in that
    pass (its affine is kept). BN and AN layers are left alone. The model's training flags
    are restored.

    Args:
        model: The model.
        x: A batch of normalized training inputs on the model's device.
        eps: Added to the variance, like BN.

    Returns:
        The number of initialized layers.
    """
    blocks = [m for m in model.modules() if _ddi_target(m)]
    fixed = [m for m in model.modules() if isinstance(m, FixedNorm)]
    if not blocks and not fixed:
        return 0
    flags = {m: m.training for m in model.modules()}

    def hook(block: nn.Module, _inputs: tuple, out: Tensor) -> Tensor:
        dims = (0,) + tuple(range(2, out.dim()))
        mean = out.mean(dim=dims)
        std = (out.var(dim=dims, unbiased=False) + eps).sqrt()
        _standardize_(block, mean, std)
        shape = (1, -1) + (1,) * (out.dim() - 2)
        return (out - mean.reshape(shape)) / std.reshape(shape)

    def pre_hook(layer: FixedNorm, inputs: tuple) -> None:
        x_in = inputs[0]
        dims = (0,) + tuple(range(2, x_in.dim()))
        layer.set_statistics_(x_in.mean(dim=dims), x_in.var(dim=dims, unbiased=False))

    handles = [b.register_forward_hook(hook) for b in blocks]
    handles += [f.register_forward_pre_hook(pre_hook) for f in fixed]
    try:
        model.eval()
        model(x)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    return len(blocks) + len(fixed)


@torch.no_grad()
def init_input_moments_(
    model: nn.Module,
    images: Tensor,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> int:
    """Fill every :class:`InputMoments` of a model from the training images.

    Channel means and variances; for stores with ``spatial=True`` (those of
    :class:`~bnprobe.norms.an_network.ANNetwork`) also the images' lag covariance
    (:func:`~bnprobe.norms.spatial.lag_covariance`, radius 10 or less for small images).

    Args:
        model: The model.
        images: Training images ``(N, C, H, W)``, uint8 (scaled to [0, 1]) or float.
        mean: Per-channel normalization mean of the model's inputs.
        std: Per-channel normalization std.

    Returns:
        The number of filled ``InputMoments`` modules.
    """
    stores = [m for m in model.modules() if isinstance(m, InputMoments)]
    if not stores:
        return 0
    m, v = dataset_channel_moments(images, mean, std)
    cov = None
    if any(getattr(store, "spatial", False) for store in stores) and images.dim() == 4:
        cov = lag_covariance(images, mean=mean, std=std)
    for store in stores:
        store.set_(m.to(store.mean), v.to(store.var), None if cov is None else cov.to(store.mean))
    return len(stores)
