"""channel_moments against a float64 reference, including a large mean and fractional subsets."""

import pytest
import torch

from bnprobe.layers import channel_moments


@pytest.mark.parametrize("shape,offset", [((16, 5, 9, 9), 0.0), ((64, 3, 32, 32), 50.0), ((7, 4), 2.0),
                                          ((3, 6, 10), -8.0)])
def test_channel_moments_match_float64(shape, offset):
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(shape[1], generator=g).mul(3).add(0.1).view((1, -1) + (1,) * (len(shape) - 2))
    x = torch.randn(shape, generator=g) * scale + offset
    var, mean = channel_moments(x)
    dims = (0, *range(2, x.dim()))
    ref_var = x.double().var(dim=dims, unbiased=False)
    ref_mean = x.double().mean(dim=dims)
    assert var.dtype == x.dtype and mean.shape == (shape[1],)
    torch.testing.assert_close(var.double(), ref_var, rtol=2e-6, atol=0)
    # the error that matters for V = (mu - M) / sigma is relative to the channel's std
    assert ((mean.double() - ref_mean).abs() / ref_var.sqrt()).max() < 1e-5


def test_channel_moments_constant_channel_is_zero_variance():
    x = torch.full((4, 2, 3, 3), 7.25)
    var, mean = channel_moments(x)
    assert torch.equal(var, torch.zeros(2)) and torch.equal(mean, torch.full((2,), 7.25))
