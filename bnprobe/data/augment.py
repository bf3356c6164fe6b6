"""Vectorized augmentation on the target device: random translation and horizontal flip."""

from __future__ import annotations

import torch


def augment(
    x: torch.Tensor,
    translate: int = 2,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Randomly translate each image by up to ``translate`` pixels and flip it horizontally.

    Translation pads with zeros (in normalized space that is the dataset mean colour) and is
    done, together with the flip, by a single gather, so the cost is one pass over the batch.

    Args:
        x: Float images (B, C, H, W).
        translate: Maximum shift in pixels along each axis (0 disables).
        flip: Flip each image horizontally with probability 1/2.
        generator: Random generator on ``x``'s device.

    Returns:
        The augmented batch (a new tensor).
    """
    if translate <= 0 and not flip:
        return x
    b, c, h, w = x.shape
    dev = x.device
    p = max(translate, 0)
    if p:
        dy = torch.randint(-p, p + 1, (b, 1), device=dev, generator=generator)
        dx = torch.randint(-p, p + 1, (b, 1), device=dev, generator=generator)
    else:
        dy = dx = torch.zeros(b, 1, dtype=torch.long, device=dev)
    cols = torch.arange(w, device=dev).expand(b, w)
    if flip:
        flipped = torch.rand(b, 1, device=dev, generator=generator) < 0.5
        cols = torch.where(flipped, w - 1 - cols, cols)
    # Output pixel (i, j) reads input pixel (i - dy, col(j) - dx); outside the image reads zero.
    rows = torch.arange(h, device=dev).expand(b, h) - dy + p
    cols = cols - dx + p
    padded = torch.nn.functional.pad(x, (p, p, p, p)) if p else x
    flat = padded.reshape(b, c, -1)
    index = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).reshape(b, 1, h * w)
    return flat.gather(2, index.expand(b, c, h * w)).reshape(b, c, h, w)
