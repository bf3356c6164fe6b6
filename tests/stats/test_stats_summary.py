from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bnprobe.stats import summarize, summarize_spatial, u_moments

BATCH = (4, 16, 64)
FRACTIONS = (0.25, 1.0)
LAYERS = (("conv1", 0, 16), ("block2.conv", 1, 36))  # name, index, spatial size z
CHANNELS = 8
DRAWS = 300
EXPECTED_COLUMNS = {
    "layer",
    "layer_index",
    "batch_size",
    "fraction",
    "spatial_size",
    "n",
    "var_v",
    "var_u",
    "sigma_v",
    "sigma_u",
    "n_eff",
    "n_eff_v",
    "n_eff_u",
    "mean_v",
    "v_bias_z",
    "v_bias_frac4",
    "mean_u",
    "eu_model",
    "u_bias_z",
    "ks_stat",
    "ks_p",
    "ks_stat_fit",
    "ks_p_fit",
    "n_draws",
    "channels",
    "slope_v",
    "slope_v_lo",
    "slope_v_hi",
    "slope_u",
    "slope_u_lo",
    "slope_u_hi",
}


def _nominal_n(k: int, z: int, fraction: float) -> int:
    return k * max(1, round(z * fraction))


def _model_table(seed: int = 0) -> pd.DataFrame:
    """Tidy samples drawn from the Gaussian model with the nominal n, rows shuffled."""
    rng = np.random.default_rng(seed)
    parts = []
    draw, channel = np.meshgrid(np.arange(DRAWS), np.arange(CHANNELS), indexing="ij")
    for name, index, z in LAYERS:
        for fraction in FRACTIONS:
            for k in BATCH:
                n = _nominal_n(k, z, fraction)
                v = rng.standard_normal((DRAWS, CHANNELS)) / np.sqrt(n)
                u = 1.0 / np.sqrt(rng.chisquare(n - 1, (DRAWS, CHANNELS)) / n)
                parts.append(
                    pd.DataFrame(
                        {
                            "layer": name,
                            "layer_index": index,
                            "channel": channel.ravel(),
                            "batch_size": k,
                            "spatial_size": z,
                            "fraction": fraction,
                            "draw": draw.ravel(),
                            "v": v.ravel(),
                            "u": u.ravel(),
                        }
                    )
                )
    table = pd.concat(parts, ignore_index=True)
    return table.sample(frac=1.0, random_state=seed).reset_index(drop=True)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return _model_table()


@pytest.fixture(scope="module")
def summary(table: pd.DataFrame) -> pd.DataFrame:
    return summarize(table, np.random.default_rng(1), n_boot=200)


def test_columns_and_one_row_per_group(summary: pd.DataFrame) -> None:
    assert set(summary.columns) == EXPECTED_COLUMNS
    assert len(summary) == len(LAYERS) * len(FRACTIONS) * len(BATCH)
    keys = summary[["layer", "batch_size", "fraction"]]
    assert not keys.duplicated().any()
    assert (summary["n_draws"] == DRAWS).all()
    assert (summary["channels"] == CHANNELS).all()
    ordered = summary.sort_values(["layer_index", "fraction", "batch_size"], kind="stable")
    assert list(ordered.index) == list(summary.index)


def test_model_statistics(summary: pd.DataFrame) -> None:
    for _, row in summary.iterrows():
        z = {name: z for name, _, z in LAYERS}[row["layer"]]
        n = _nominal_n(row["batch_size"], z, row["fraction"])
        assert row["n"] == n
        assert row["spatial_size"] == z
        assert row["var_v"] * n == pytest.approx(1.0, rel=0.15)
        assert row["var_u"] == pytest.approx(u_moments(n)[1], rel=0.15)
        assert row["sigma_v"] == pytest.approx(np.sqrt(row["var_v"]))
        assert row["n_eff"] == pytest.approx(n, rel=0.1)
        assert row["n_eff_v"] == pytest.approx(n, rel=0.15)
        assert row["n_eff_u"] == pytest.approx(n, rel=0.15)
    assert (summary["ks_p"] > 0.001).mean() >= 0.8
    # No bias under the model: |z_c| ~ half-normal, whose median 0.674 the median of C
    # channels estimates with sd 1 / (2 f(0.674) sqrt(C)), f(0.674) = 0.636.
    half_width = 4 / (2 * 0.636 * np.sqrt(CHANNELS))
    assert (summary["v_bias_z"] - 0.674).abs().max() < half_width
    assert (summary["v_bias_frac4"] == 0).all()
    assert (summary["u_bias_z"].abs() < 4).all()
    assert (summary["ks_p_fit"] > 0.001).mean() >= 0.8


def test_slopes(summary: pd.DataFrame) -> None:
    for _, group in summary.groupby(["layer", "fraction"]):
        for col in ("slope_v", "slope_v_lo", "slope_v_hi", "slope_u", "slope_u_lo", "slope_u_hi"):
            assert group[col].nunique() == 1  # repeated on the layer's rows
    assert np.allclose(summary["slope_v"], -1.0, atol=0.15)
    assert np.allclose(summary["slope_u"], -1.0, atol=0.15)
    assert (summary["slope_v_lo"] < summary["slope_v"]).all()
    assert (summary["slope_v"] < summary["slope_v_hi"]).all()


def test_matches_direct_computation(table: pd.DataFrame, summary: pd.DataFrame) -> None:
    sub = table[
        (table.layer == "block2.conv") & (table.batch_size == 16) & (table.fraction == 0.25)
    ]
    v = sub.pivot(index="draw", columns="channel", values="v").to_numpy()
    u = sub.pivot(index="draw", columns="channel", values="u").to_numpy()
    row = summary[
        (summary.layer == "block2.conv") & (summary.batch_size == 16) & (summary.fraction == 0.25)
    ].iloc[0]
    assert row["var_v"] == pytest.approx(np.mean(np.var(v, axis=0, ddof=1)), rel=1e-12)
    assert row["var_u"] == pytest.approx(np.mean(np.var(u, axis=0, ddof=1)), rel=1e-12)
    # n_eff_v comes from V centred per channel (pooled unbiased variance), not 1/mean(v^2).
    assert row["n_eff_v"] == pytest.approx(1.0 / row["var_v"], rel=1e-12)
    assert row["mean_v"] == pytest.approx(v.mean(), rel=1e-12)
    assert row["mean_u"] == pytest.approx(u.mean(), rel=1e-12)
    z = v.mean(axis=0) / (v.std(axis=0, ddof=1) / np.sqrt(DRAWS))
    assert row["v_bias_z"] == pytest.approx(np.median(np.abs(z)), rel=1e-12)
    assert row["v_bias_frac4"] == np.mean(np.abs(z) > 4)
    assert row["eu_model"] == pytest.approx(u_moments(row["n_eff_u"])[0], rel=1e-12)
    se = u.mean(axis=1).std(ddof=1) / np.sqrt(DRAWS)
    assert row["u_bias_z"] == pytest.approx((u.mean() - row["eu_model"]) / se, rel=1e-9)


def test_reproducible(table: pd.DataFrame, summary: pd.DataFrame) -> None:
    again = summarize(table, np.random.default_rng(1), n_boot=200)
    pd.testing.assert_frame_equal(summary, again)


def test_spatial_slopes(table: pd.DataFrame) -> None:
    spatial = summarize_spatial(table, np.random.default_rng(2), n_boot=200)
    assert list(spatial.columns) == [
        "layer",
        "layer_index",
        "batch_size",
        "slope_v",
        "slope_v_lo",
        "slope_v_hi",
        "slope_u",
        "slope_u_lo",
        "slope_u_hi",
    ]
    assert len(spatial) == len(LAYERS) * len(BATCH)
    assert np.allclose(spatial["slope_v"], -1.0, atol=0.12)
    # Var[U] is only asymptotically 1/(2n): compare with the exact slope of the model.
    z = {name: z for name, _, z in LAYERS}
    for _, row in spatial.iterrows():
        n_small = _nominal_n(row["batch_size"], z[row["layer"]], FRACTIONS[0])
        n_large = _nominal_n(row["batch_size"], z[row["layer"]], FRACTIONS[1])
        exact = np.log(u_moments(n_large)[1] / u_moments(n_small)[1]) / np.log(n_large / n_small)
        assert row["slope_u"] == pytest.approx(exact, abs=0.12)
        assert row["slope_u_lo"] < row["slope_u"] < row["slope_u_hi"]
    # A single fraction gives no spatial rows.
    one = summarize_spatial(table[table.fraction == 1.0], np.random.default_rng(2), n_boot=10)
    assert len(one) == 0


def test_spatially_correlated_samples_give_small_neff() -> None:
    # Samples drawn with n_eff = n/4 must be reported as such, with the nominal KS failing.
    table = _model_table(seed=3)
    table = table[table.fraction == 1.0].copy()
    n = table.batch_size * table.spatial_size
    rng = np.random.default_rng(4)
    n_eff = n / 4
    table["v"] = rng.standard_normal(len(table)) / np.sqrt(n_eff)
    table["u"] = 1.0 / np.sqrt(rng.chisquare(n_eff - 1) / n_eff)
    out = summarize(table, np.random.default_rng(5), n_boot=50)
    np.testing.assert_allclose(out["n_eff"] / out["n"], 0.25, rtol=0.1)
    assert (out["ks_p"] < 1e-3).all()


def test_errors(table: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="lacks columns"):
        summarize(table.drop(columns="u"), np.random.default_rng(0))
    with pytest.raises(ValueError, match="grid"):
        summarize(table.iloc[1:], np.random.default_rng(0), n_boot=10)
    empty = summarize(table.iloc[:0], np.random.default_rng(0))
    assert len(empty) == 0 and set(empty.columns) == EXPECTED_COLUMNS
