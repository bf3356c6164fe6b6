from __future__ import annotations

import numpy as np
import pytest

from bnprobe.stats import scaling_slope
from bnprobe.stats.scaling import _bootstrap_channel_mean_var

BATCH = np.array([4, 8, 16, 32, 64])


def _groups(power: float, seed: int, draws: int = 300, channels: int = 16) -> list[np.ndarray]:
    """Groups whose variance is exactly proportional to k^-power."""
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.5, 2.0, size=channels)  # per-channel scale, same for every k
    return [rng.standard_normal((draws, channels)) * scales * k ** (-power / 2) for k in BATCH]


def test_slope_minus_one() -> None:
    res = scaling_slope(BATCH, _groups(1.0, seed=0), np.random.default_rng(1), n_boot=500)
    assert res["slope"] == pytest.approx(-1.0, abs=0.05)
    assert res["lo"] < -1.0 < res["hi"]
    assert res["lo"] < res["slope"] < res["hi"]


def test_slope_minus_two_excludes_minus_one() -> None:
    res = scaling_slope(BATCH, _groups(2.0, seed=2), np.random.default_rng(3), n_boot=500)
    assert res["slope"] == pytest.approx(-2.0, abs=0.05)
    assert res["lo"] < -2.0 < res["hi"]
    assert res["hi"] < -1.0


def test_point_slope_matches_polyfit() -> None:
    groups = _groups(1.0, seed=4)
    stat = [np.mean(np.var(g, axis=0, ddof=1)) for g in groups]
    ref = np.polyfit(np.log(BATCH), np.log(stat), 1)[0]
    res = scaling_slope(BATCH, groups, np.random.default_rng(0), n_boot=10)
    assert res["slope"] == pytest.approx(ref, rel=1e-12)


def test_bootstrap_replicates_match_naive_resampling() -> None:
    rng_data = np.random.default_rng(5)
    block = rng_data.standard_normal((50, 6)) * np.arange(1, 7)
    # Same generator state -> same row indices as a naive row resampling.
    fast = _bootstrap_channel_mean_var(block, np.random.default_rng(11), n_boot=20)
    rng = np.random.default_rng(11)
    idx = rng.integers(0, 50, size=(20, 50))
    naive = [np.mean(np.var(block[row], axis=0, ddof=1)) for row in idx]
    np.testing.assert_allclose(fast, naive, rtol=1e-10)


def test_reproducible_and_seed_dependent() -> None:
    groups = _groups(1.0, seed=6)
    a = scaling_slope(BATCH, groups, np.random.default_rng(7), n_boot=200)
    b = scaling_slope(BATCH, groups, np.random.default_rng(7), n_boot=200)
    c = scaling_slope(BATCH, groups, np.random.default_rng(8), n_boot=200)
    assert a == b
    assert a["slope"] == c["slope"]
    assert (a["lo"], a["hi"]) != (c["lo"], c["hi"])


def test_fewer_than_two_x_gives_nan() -> None:
    groups = _groups(1.0, seed=9)
    for x, g in (([4], groups[:1]), ([], []), ([4, 4], groups[:2])):
        res = scaling_slope(x, g, np.random.default_rng(0), n_boot=10)
        assert all(np.isnan(res[key]) for key in ("slope", "lo", "hi"))


def test_bad_inputs() -> None:
    groups = _groups(1.0, seed=9)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        scaling_slope(BATCH, groups, rng, stat="mean")
    with pytest.raises(ValueError):
        scaling_slope(BATCH[:3], groups, rng)


def test_interval_width_matches_sampling_spread() -> None:
    # The 95% bootstrap interval should be about +-1.96 sd of the slope over fresh datasets.
    rng = np.random.default_rng(12)
    points = [
        scaling_slope(BATCH, _groups(1.0, seed=100 + i, draws=100, channels=4), rng, n_boot=0)
        for i in range(200)
    ]
    sd = np.std([p["slope"] for p in points], ddof=1)
    widths = []
    for i in range(10):
        res = scaling_slope(BATCH, _groups(1.0, seed=i, draws=100, channels=4), rng, n_boot=400)
        widths.append(res["hi"] - res["lo"])
    assert np.mean(widths) / (2 * 1.96 * sd) == pytest.approx(1.0, abs=0.25)
