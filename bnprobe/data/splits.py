"""Seeded train/validation split."""

from __future__ import annotations

import torch

VAL_FRACTION = 0.1
SPLIT_SEED = 0


def train_val_split(
    n: int, val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(n)`` into sorted train and validation indices with a seeded permutation.

    Args:
        n: Number of training images.
        val_fraction: Fraction held out for validation.
        seed: Seed of the private generator; the same seed always gives the same split.

    Returns:
        ``(train_indices, val_indices)``, each sorted.
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_val = int(round(val_fraction * n))
    return perm[n_val:].sort().values, perm[:n_val].sort().values
