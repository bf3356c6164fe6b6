"""scikit-learn's bundled 8x8 handwritten digits: real data that ships with the package."""

from __future__ import annotations

import torch

from ._image_data import ImageData

TEST_FRACTION = 0.2
TEST_SPLIT_SEED = 0


def load_digits() -> ImageData:
    """Load the 1,797 8x8 digits, holding out a fixed, seeded 20% as the test set.

    Pixel values 0..16 are scaled to 0..255 and stored as uint8 with one channel. Digits are
    not flipped during augmentation.

    Returns:
        The dataset.
    """
    from sklearn.datasets import load_digits as _sk_load

    bunch = _sk_load()
    x = torch.from_numpy(bunch.images).mul(255.0 / 16.0).round().clamp(0, 255).to(torch.uint8)
    x = x.unsqueeze(1)
    y = torch.from_numpy(bunch.target).to(torch.int64)
    g = torch.Generator().manual_seed(TEST_SPLIT_SEED)
    perm = torch.randperm(len(x), generator=g)
    n_test = int(round(TEST_FRACTION * len(x)))
    test, train = perm[:n_test].sort().values, perm[n_test:].sort().values
    return ImageData(
        name="digits",
        root=None,
        train_x=x[train],
        train_y=y[train],
        test_x=x[test],
        test_y=y[test],
        classes=[str(i) for i in range(10)],
        flip=False,
    )
