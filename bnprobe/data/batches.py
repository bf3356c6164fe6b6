"""Normalized, optionally augmented batches drawn from uint8 images held on the device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .augment import augment


@dataclass
class Normalization:
    """Per-channel normalization and augmentation settings of a dataset.

    Attributes:
        mean: Per-channel mean of images scaled to [0, 1].
        std: Per-channel standard deviation.
        translate: Random translation in pixels during training (0 disables).
        flip: Random horizontal flip during training.
    """

    mean: Sequence[float]
    std: Sequence[float]
    translate: int = 2
    flip: bool = True


class DeviceImages:
    """uint8 images and labels moved once to a device, served as normalized float batches.

    Args:
        images: uint8 tensor (N, C, H, W).
        labels: int64 tensor (N,).
        norm: Normalization and augmentation settings.
        device: Target device.
        dtype: Floating dtype of the batches.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        norm: Normalization,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.norm = norm
        self.device = torch.device(device)
        self.dtype = dtype
        shape = (1, -1, 1, 1)
        self._mean = torch.tensor(norm.mean, dtype=dtype, device=device).view(shape)
        self._inv_std = 1.0 / torch.tensor(norm.std, dtype=dtype, device=device).view(shape)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(
        self,
        index: torch.Tensor,
        augmented: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the normalized images and labels at ``index``.

        Args:
            index: Indices into this set (any device).
            augmented: Apply the training augmentation.
            generator: Random generator on this set's device (for augmentation).

        Returns:
            ``(x, y)`` on this set's device.
        """
        index = index.to(self.device)
        x = self.images[index].to(self.dtype).mul_(1.0 / 255.0).sub_(self._mean).mul_(self._inv_std)
        if augmented:
            x = augment(x, self.norm.translate, self.norm.flip, generator)
        return x, self.labels[index]

    def iterate(
        self,
        batch_size: int,
        shuffle: bool = False,
        augmented: bool = False,
        generator: torch.Generator | None = None,
        aug_generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate over the set in batches.

        Args:
            batch_size: Images per batch.
            shuffle: Draw a random permutation (on the CPU, from ``generator``).
            augmented: Apply the training augmentation.
            generator: CPU generator for the permutation.
            aug_generator: Device generator for augmentation.
            drop_last: Skip a final incomplete batch.

        Yields:
            ``(x, y)`` batches.
        """
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            yield self.batch(order[start : start + batch_size], augmented, aug_generator)


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Number of batches ``iterate`` yields for ``n`` items."""
    return n // batch_size if drop_last else -(-n // batch_size)
