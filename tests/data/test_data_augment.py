import itertools

import torch

from bnprobe.data import DataSpec, augment
from bnprobe.data.digits import load_digits


def _unique_images(b=64, c=2, h=6, w=7):
    return torch.arange(1, b * c * h * w + 1, dtype=torch.float32).reshape(b, c, h, w)


def _shift(img, dy, dx):
    """Reference: output pixel (i, j) = input (i - dy, j - dx), zero outside."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    for i, j in itertools.product(range(h), range(w)):
        si, sj = i - dy, j - dx
        if 0 <= si < h and 0 <= sj < w:
            out[..., i, j] = img[..., si, sj]
    return out


def test_translation_really_shifts_with_zero_padding():
    x = _unique_images()
    y = augment(x, translate=2, flip=False, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    seen = set()
    for img, out in zip(x, y):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(out, _shift(img, dy, dx))]
        assert len(matches) == 1, "each output must be exactly one shift of its input"
        seen.add(matches[0])
    assert len(seen) >= 15
    assert any(s != (0, 0) for s in seen)


def test_flip_really_flips():
    x = _unique_images()
    y = augment(x, translate=0, flip=True, generator=torch.Generator().manual_seed(1))
    flipped = [torch.equal(o, i.flip(-1)) for i, o in zip(x, y)]
    same = [torch.equal(o, i) for i, o in zip(x, y)]
    assert all(f or s for f, s in zip(flipped, same))
    assert 10 < sum(flipped) < 54


def test_values_stay_in_range_and_seeded():
    x = torch.rand(32, 3, 8, 8)
    a = augment(x, 2, True, torch.Generator().manual_seed(5))
    b = augment(x, 2, True, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= x.max()
    assert augment(x, 0, False) is x


def test_digits_are_never_flipped():
    spec = DataSpec.from_data(load_digits())
    assert spec.flip is False and spec.normalization.flip is False
