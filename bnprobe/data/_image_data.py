"""The in-memory dataset container shared by every reader."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..errors import BnprobeError


@dataclass
class ImageData:
    """A dataset held in memory as uint8 images.

    Attributes:
        name: Dataset name (``digits``, ``cifar10``, ``imagefolder``, ``synthetic``).
        root: Where it was read from (None for generated or bundled data).
        train_x: Training images, uint8, shape (N, C, H, W).
        train_y: Training labels, int64, shape (N,).
        test_x: Test images, uint8.
        test_y: Test labels, int64.
        classes: Class names in label order.
        flip: Whether horizontal flips are a valid augmentation for this data.
        fingerprint: sha256 over the images and labels (computed on demand).
    """

    name: str
    root: str | None
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    flip: bool = True
    _fingerprint: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for part, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise BnprobeError(f"{self.name}: {part} images must be uint8 (N, C, H, W)")
            if len(x) != len(y):
                raise BnprobeError(f"{self.name}: {part} has {len(x)} images but {len(y)} labels")
        if len(self.train_x) == 0:
            raise BnprobeError(f"{self.name}: the training split is empty")
        if self.train_x.shape[1:] != self.test_x.shape[1:] and len(self.test_x):
            raise BnprobeError(f"{self.name}: train and test images differ in shape")

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Image shape (C, H, W)."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def fingerprint(self) -> str:
        """sha256 over the uint8 images and int64 labels of both splits."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for t in (self.train_x, self.train_y, self.test_x, self.test_y):
                h.update(t.contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def with_channels(self, channels: int | None) -> ImageData:
        """The same images with ``channels`` channels (1 <-> 3); ``self`` when they already have it.

        Grayscale to RGB repeats the channel; RGB to grayscale takes the luminance
        ``0.299 R + 0.587 G + 0.114 B`` (ITU-R 601, as PIL's ``convert("L")``), rounded.

        Raises:
            BnprobeError: For any other conversion.
        """
        have = self.input_shape[0]
        if channels is None or channels == have:
            return self
        def convert(x: torch.Tensor) -> torch.Tensor:
            if have == 1 and channels == 3:
                return x.repeat(1, 3, 1, 1)
            if have == 3 and channels == 1:
                w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)
                return (x.double() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
            raise BnprobeError(f"{self.name}: cannot convert {have}-channel images to {channels} channels "
                               "(--channels supports 1 <-> 3)")
        return ImageData(self.name, self.root, convert(self.train_x), self.train_y, convert(self.test_x),
                         self.test_y, list(self.classes), self.flip)

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and standard deviation of the training images scaled to [0, 1]."""
        x = self.train_x.to(torch.float64).div_(255.0)
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
        return mean.tolist(), std.tolist()
