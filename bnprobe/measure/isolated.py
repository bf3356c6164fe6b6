"""Isolated-mode draws from per-input sufficient statistics, without forward passes.

With every upstream BN deterministic, a layer's input for a given input image does not depend
on the batch it is drawn with. A batch's mean and variance per channel are then functions of
the per-input sums of ``x - c`` and ``(x - c)^2`` (see :class:`.reference.LayerSums`), so any
number of batches of any size is drawn by index sampling alone.
"""

from __future__ import annotations

import torch

from .reference import LayerSums


def draw_indices(n: int, k: int, draws: int, generator: torch.Generator) -> torch.Tensor:
    """``draws`` batches of ``k`` distinct indices out of ``n`` (one ``randperm`` per batch).

    Joint, forward-pass isolated and sufficient-statistics draws all use this, so the same
    generator state gives the same batches.
    """
    return torch.stack([torch.randperm(n, generator=generator)[:k] for _ in range(draws)])


def isolated_vu(
    sums: LayerSums,
    reference: tuple[torch.Tensor, torch.Tensor],
    eps: float,
    fraction: float,
    index: torch.Tensor,
    augment_draw: torch.Tensor | None = None,
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """V and U of the batches ``index`` (draws x k) from the layer's sufficient statistics.

    Args:
        sums: The layer's per-input sums.
        reference: ``(mu, sigma^2)`` of the layer's input.
        eps: The BN layer's epsilon (inside both square roots, as BN computes).
        fraction: Spatial fraction (must be one the sums were recorded for).
        index: (draws, k) input indices.
        augment_draw: (draws, k) augmentation copy of each input (None: copy 0).
        chunk: Draws per vectorized step (bounds memory at chunk * k * C values).

    Returns:
        ``(v, u)``, each (draws, C) float64.
    """
    s1, s2 = sums.sums[fraction]
    mu, var_ref = reference
    std = (var_ref.to(s1) + eps).sqrt()
    m = index.shape[1] * sums.positions(fraction)
    idx = index.to(s1.device)
    aug = torch.zeros_like(idx) if augment_draw is None else augment_draw.to(s1.device)
    vs, us = [], []
    for start in range(0, idx.shape[0], chunk):
        i, a = idx[start : start + chunk], aug[start : start + chunk]
        d1 = s1[a, i].sum(1) / m
        var = (s2[a, i].sum(1) / m - d1.square()).clamp_min(0)
        vs.append((mu.to(s1) - (sums.shift + d1)) / std)
        us.append(std / (var + eps).sqrt())
    return torch.cat(vs), torch.cat(us)
