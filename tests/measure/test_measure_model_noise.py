"""On a bare BN layer fed i.i.d. Gaussian data the measured noise follows the model exactly."""

import numpy as np
import torch
from scipy import stats
from torch import nn

from bnprobe.measure import measure
from bnprobe.stats import u_moments


def _bare_bn(channels=8):
    bn = nn.BatchNorm2d(channels, eps=1e-12)
    bn.eval()  # running mean 0, var 1: the true population statistics
    return nn.Sequential(bn)


def test_s2_ratio_is_chi2_and_v_has_variance_one_over_n():
    k, z, channels = 4, 4 * 4, 8
    n = k * z
    passed, nvar = 0, []
    for seed in range(10):
        g = torch.Generator().manual_seed(100 + seed)
        data = torch.randn(4000, channels, 4, 4, generator=g, dtype=torch.float64)
        model = _bare_bn(channels).double()
        m = measure(model, data, [k], samples=200, reference="running",
                    generator=torch.Generator().manual_seed(seed))
        s = m.samples
        ratio = n / s["u"].to_numpy() ** 2  # n S^2 / sigma^2
        if stats.kstest(ratio, stats.chi2(n - 1).cdf).pvalue > 0.01:
            passed += 1
        nvar.append(n * s.groupby("channel")["v"].var().mean())
    assert passed >= 8
    assert abs(np.mean(nvar) - 1) < 0.1
    # and a wrong model is rejected on the same kind of data
    wrong = stats.kstest(ratio, stats.chi2(n // 2 - 1).cdf).pvalue
    assert wrong < 1e-6


def test_u_moments_against_monte_carlo():
    rng = np.random.default_rng(0)
    for n in (8, 64, 1024):
        u = np.sqrt(n) / np.sqrt(rng.chisquare(n - 1, size=400_000))
        mean, var = u_moments(n)
        assert abs(u.mean() - mean) < 4 * u.std() / np.sqrt(len(u))
        assert abs(u.var() / var - 1) < 0.03
