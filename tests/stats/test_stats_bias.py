"""Bias checks of the summary (mean_v, v_bias_z, v_bias_frac4, mean_u, eu_model, u_bias_z)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bnprobe.stats import summarize

K, Z = 8, 64  # n = 512


def _summary(table: pd.DataFrame) -> pd.Series:
    return summarize(table, np.random.default_rng(0), n_boot=0).iloc[0]


@pytest.mark.parametrize("n", [16, 128, 1024])
def test_no_bias_under_the_model(n: int, bn_batches, tidy_table) -> None:
    zs = []
    for seed in range(8):
        v, u = bn_batches(n, seed=seed)
        row = _summary(tidy_table(v, u, batch_size=n, spatial_size=1))
        # Median |z_c| of 32 half-normals: 0.674 with sd 1 / (2 * 0.636 * sqrt(32)) = 0.14.
        assert abs(row["v_bias_z"] - 0.674) < 4 * 0.14
        assert row["v_bias_frac4"] == 0.0
        assert row["mean_v"] == pytest.approx(0.0, abs=4 / np.sqrt(n * v.size))
        zs.append(row["u_bias_z"])
    zs = np.array(zs)
    assert np.all(np.abs(zs) < 4)
    assert np.abs(zs).max() > 0.05  # not degenerate


def test_u_bias_z_is_standard_normal(bn_batches, tidy_table) -> None:
    zs = np.array([
        _summary(tidy_table(*bn_batches(64, seed=1000 + s), batch_size=64, spatial_size=1))["u_bias_z"]
        for s in range(60)
    ])
    assert abs(zs.mean()) < 4 / np.sqrt(zs.size)
    assert 0.7 < zs.std(ddof=1) < 1.4


def test_bias_and_scale_error_are_flagged_but_leave_n_eff(bn_batches, tidy_table) -> None:
    v, u = bn_batches(K * Z, seed=7)
    clean = _summary(tidy_table(v, u, K, Z))
    biased = _summary(tidy_table(v + 0.15, u * 1.1, K, Z))
    for col in ("n_eff", "n_eff_v", "n_eff_u", "var_v", "eu_model"):
        assert biased[col] == pytest.approx(clean[col], rel=1e-9), col
    assert biased["n_eff"] == pytest.approx(K * Z, rel=0.05)
    assert biased["mean_v"] == pytest.approx(clean["mean_v"] + 0.15, rel=1e-9)
    # V: 0.15 is ~ 0.15 / (1/sqrt(512)/sqrt(200)) ~ 48 standard errors in every channel.
    assert biased["v_bias_frac4"] == 1.0 and biased["v_bias_z"] > 30
    assert clean["v_bias_frac4"] == 0.0 and clean["v_bias_z"] < 0.674 + 4 * 0.14
    # U: 10% of E[U] ~ 1 against an SE of ~ 1/sqrt(2 * 512 * 32 * 200).
    assert biased["mean_u"] == pytest.approx(1.1 * clean["mean_u"], rel=1e-9)
    assert biased["u_bias_z"] > 50
    assert abs(clean["u_bias_z"]) < 4


def test_small_n_eff_and_single_draw_give_nan(tidy_table) -> None:
    rng = np.random.default_rng(3)
    # n_eff_u <= 3: E[U] of the model does not exist.
    v = rng.standard_normal((50, 4)) / np.sqrt(2.5)
    u = 1.0 / np.sqrt(rng.gamma(0.75, 2 / 2.5, (50, 4)))
    row = _summary(tidy_table(v, u, 1, 2))
    assert row["n_eff_u"] < 3.0
    assert np.isnan(row["eu_model"]) and np.isnan(row["u_bias_z"])
    assert np.isfinite(row["mean_u"]) and np.isfinite(row["v_bias_z"])
    # One draw: nothing can be centred; NaN instead of an error.
    one = _summary(tidy_table(v[:1], u[:1], 4, 4))
    for col in ("n_eff", "n_eff_v", "n_eff_u", "v_bias_z", "u_bias_z", "ks_stat_fit"):
        assert np.isnan(one[col]), col
