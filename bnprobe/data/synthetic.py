"""Small generated image data for tests and smoke runs."""

from __future__ import annotations

import torch

from ._image_data import ImageData


def make_synthetic(
    n_train: int = 512,
    n_test: int = 128,
    channels: int = 3,
    size: int = 8,
    num_classes: int = 4,
    seed: int = 0,
) -> ImageData:
    """Generate a learnable toy dataset: one smooth template per class plus pixel noise.

    Args:
        n_train: Number of training images.
        n_test: Number of test images.
        channels: Image channels.
        size: Image height and width.
        num_classes: Number of classes.
        seed: Seed of the private generator (the global RNG is not touched).

    Returns:
        The dataset.
    """
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, channels, size // 2 or 1, size // 2 or 1, generator=g)
    templates = torch.nn.functional.interpolate(templates, size=(size, size), mode="bilinear")

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(num_classes, (n,), generator=g)
        x = templates[y] * 0.7 + 0.3 * torch.rand(n, channels, size, size, generator=g)
        return (x * 255).round().clamp(0, 255).to(torch.uint8), y

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return ImageData(
        name="synthetic",
        root=None,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        classes=[f"class{i}" for i in range(num_classes)],
    )
