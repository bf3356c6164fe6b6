import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bnprobe.errors import BnprobeError
from bnprobe.measure import Measurements, fit_noise
from bnprobe.noise import NoiseSpec
from bnprobe.plots import (
    figure_paths,
    plot_batch_scaling,
    plot_chi2,
    plot_curves,
    plot_noise,
    plot_spatial_scaling,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = [("block1.bn", 16, 4), ("block2.bn", 4, 6), ("head.bn", 2, 3)]  # name, spatial size, channels


def _synthetic(batch_sizes=(4, 16), fractions=(0.5, 1.0), draws=30, seed=0) -> Measurements:
    """Samples drawn from the Gaussian model itself: v ~ N(0, 1/n), u = sqrt(n)/chi_{n-1}."""
    rng = np.random.default_rng(seed)
    frames, layer_rows, refs = [], [], []
    for index, (name, z, c) in enumerate(LAYERS):
        layer_rows.append({"name": name, "index": index, "channels": c, "spatial_size": z, "eps": 1e-5,
                           "ref_mean": 0.0, "ref_var": 1.0})
        refs.append(pd.DataFrame({"layer": name, "channel": np.arange(c), "mean": 0.0, "var": 1.0}))
        for k in batch_sizes:
            for f in fractions:
                n = k * max(1, round(z * f))
                size = draws * c
                frames.append(pd.DataFrame({
                    "layer": name, "layer_index": index, "channel": np.tile(np.arange(c), draws),
                    "batch_size": k, "spatial_size": z, "fraction": f,
                    "draw": np.repeat(np.arange(draws), c),
                    "v": rng.normal(0.0, 1.0 / np.sqrt(n), size),
                    "u": np.sqrt(n) / np.sqrt(rng.chisquare(n - 1, size)),
                }))
    meta = {"format": "bnprobe.measurements", "version": 1}
    return Measurements(pd.concat(frames, ignore_index=True), pd.DataFrame(layer_rows),
                        pd.concat(refs, ignore_index=True), meta)


@pytest.fixture(scope="module")
def meas():
    return _synthetic()


@pytest.fixture(scope="module")
def summary(meas):
    return meas.summary(n_boot=20)


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5000


def _runs(tmp_path):
    dirs = []
    for i, norm in enumerate(["bn", "wn"]):
        d = tmp_path / f"run_{norm}"
        d.mkdir()
        epochs = np.arange(1, 6)
        pd.DataFrame({"epoch": epochs, "lr": 0.05, "train_loss": 2.0 / epochs + i,
                      "train_eval_loss": 1.8 / epochs + i, "val_loss": 2.1 / epochs + i,
                      "val_acc": 0.5 + 0.05 * epochs}).to_csv(d / "metrics.csv", index=False)
        (d / "config.json").write_text(json.dumps({"config": {"norm": norm}}))
        dirs.append(d)
    return dirs


# Rendering dominates the runtime: every function writes a PNG, and the PDF path (shared by all,
# in _style.save_figure) is exercised by the layer-level chi2 figure and by the CLI tests.
@pytest.mark.parametrize("kind,pdf", [("chi2", True), ("batch", False), ("spatial", False),
                                      ("noise", False), ("curves", False)])
def test_each_plot_writes_png_and_pdf_when_asked(tmp_path, meas, summary, kind, pdf):
    out = tmp_path / "figs" / f"{kind}.png"
    if kind == "chi2":
        fig = plot_chi2(meas, layer=0, out=out, pdf=pdf, summary=summary)
    elif kind == "batch":
        fig = plot_batch_scaling(meas, out=out, pdf=pdf, summary=summary)
    elif kind == "spatial":
        fig = plot_spatial_scaling(meas, out=out, pdf=pdf, summary=summary)
    elif kind == "noise":
        fig = plot_noise(fit_noise(meas, 16, summary=summary), out=out, pdf=pdf)
    else:
        fig = plot_curves(_runs(tmp_path), out=out, pdf=pdf)
    assert fig.axes
    _check_png(out)
    names = [f"{kind}.pdf", f"{kind}.png"] if pdf else [f"{kind}.png"]
    assert sorted(p.name for p in out.parent.iterdir()) == names  # and no temporary files left
    if pdf:
        assert out.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"


def test_no_out_writes_nothing(tmp_path, meas, summary, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plot_batch_scaling(meas, summary=summary)
    assert list(tmp_path.iterdir()) == []


def test_figure_paths():
    assert [p.name for p in figure_paths("figs/a", pdf=True)] == ["a.png", "a.pdf"]
    assert [p.name for p in figure_paths("a.pdf", pdf=True)] == ["a.pdf"]


def test_chi2_grid_has_one_axes_per_layer(meas, summary):
    fig = plot_chi2(meas, summary=summary)
    assert len(fig.axes) == len(LAYERS)
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["0", "1", "2"]
    assert all("k=16" in ax.get_title() for ax in fig.axes)  # middle of [4, 16]: no 32 measured


def test_chi2_curves_are_the_scipy_densities(meas, summary):
    fig = plot_chi2(meas, layer="block2.bn", batch_size=4, summary=summary)
    (ax,) = fig.axes
    lines = {line.get_gid(): line for line in ax.get_lines()}
    row = summary[(summary["layer"] == "block2.bn") & (summary["batch_size"] == 4)
                  & (summary["fraction"] == 1.0)].iloc[0]
    n, n_eff = float(row["n"]), float(row["n_eff"])
    assert n == 16
    x, y = lines["nominal"].get_data()
    pick = np.linspace(0, len(x) - 1, 5).astype(int)
    np.testing.assert_allclose(y[pick], stats.chi2(n - 1).pdf(x[pick]), rtol=1e-12)
    x, y = lines["fitted"].get_data()
    np.testing.assert_allclose(y[pick], stats.chi2(n_eff - 1, scale=n / n_eff).pdf(x[pick]), rtol=1e-12)
    labels = ax.get_legend_handles_labels()[1]
    assert any("n=16" in s and "KS p=" in s for s in labels)
    assert any(f"={n_eff:.0f}" in s for s in labels)


def test_chi2_layer_by_index_equals_by_name(meas, summary):
    by_name = plot_chi2(meas, layer="head.bn", summary=summary).axes[0].get_title()
    assert plot_chi2(meas, layer=2, summary=summary).axes[0].get_title() == by_name
    assert plot_chi2(meas, layer="2", summary=summary).axes[0].get_title() == by_name


def test_chi2_without_summary_fits_only_what_it_shows(meas):
    fig = plot_chi2(meas, layer=0, batch_size=16)
    assert "nominal" in {line.get_gid() for line in fig.axes[0].get_lines()}


@pytest.mark.parametrize("layer,needle", [("nope", "'nope'"), (7, "7")])
def test_unknown_layer_is_named(meas, summary, layer, needle):
    with pytest.raises(BnprobeError, match=needle) as info:
        plot_chi2(meas, layer=layer, summary=summary)
    assert "block1.bn" in str(info.value)  # lists the measured layers


def test_unmeasured_batch_size_is_named(meas, summary):
    with pytest.raises(BnprobeError, match="batch size 64 was not measured.*4, 16"):
        plot_chi2(meas, batch_size=64, summary=summary)
    with pytest.raises(BnprobeError, match="batch size 8"):
        plot_spatial_scaling(meas, batch_size=8, summary=summary)


def test_batch_scaling_guide_has_slope_minus_one(meas, summary):
    fig = plot_batch_scaling(meas, summary=summary)
    panels = [ax for ax in fig.axes if ax.get_lines()]
    assert len(panels) == 2
    for ax in panels:
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        (guide,) = [line for line in ax.get_lines() if line.get_gid() == "slope_guide"]
        x, y = (np.asarray(a, dtype=float) for a in guide.get_data())
        assert np.log(y[-1] / y[0]) / np.log(x[-1] / x[0]) == pytest.approx(-1.0)
        assert len(ax.get_lines()) == len(LAYERS) + 1
    legend_texts = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("0 block1.bn: ") for t in legend_texts)


def test_spatial_scaling_rows(meas, summary):
    fig = plot_spatial_scaling(meas, summary=summary)
    assert len([ax for ax in fig.axes if ax.get_lines()]) == 4  # second row: fractions < 1 measured
    full_only = _synthetic(fractions=(1.0,))
    fig = plot_spatial_scaling(full_only, summary=full_only.summary(n_boot=0))
    assert len([ax for ax in fig.axes if ax.get_lines()]) == 2


def test_noise_from_spec_file_and_measurements(tmp_path, meas, summary):
    spec = fit_noise(meas, 16, summary=summary)
    path = spec.save(tmp_path / "fitted.json")
    fig = plot_noise(path)
    assert "k = 16" in fig.get_suptitle()
    ticks = [t.get_text() for t in fig.axes[1].get_xticklabels()]
    assert ticks == ["0 block1.bn", "1 block2.bn", "2 head.bn"]
    assert isinstance(spec, NoiseSpec)
    assert "k = 4" in plot_noise(meas, batch_size=4).get_suptitle()
    with pytest.raises(BnprobeError, match="batch size 16, not 4"):
        plot_noise(path, batch_size=4)
    with pytest.raises(BnprobeError, match="not found"):
        plot_noise(tmp_path / "missing.json")
    folder = meas.save(tmp_path / "m")  # a measurement folder without fitted.json: fitted on the fly
    assert "k = 16" in plot_noise(folder).get_suptitle()
    path.replace(folder / "fitted.json")  # with one: read from it
    assert "k = 16" in plot_noise(folder).get_suptitle()


def test_curves_labels_and_errors(tmp_path):
    runs = _runs(tmp_path)
    (runs[1] / "config.json").unlink()
    fig = plot_curves(runs, metrics=["train_loss", "train_eval_loss", "val_acc"])
    assert len(fig.axes) == 3
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["run_bn (bn)", "run_wn"]
    assert fig.axes[0].get_yscale() == "log" and fig.axes[2].get_yscale() == "linear"
    fig = plot_curves(runs, metrics=["val_loss"], labels=["a", "b"])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b"]
    with pytest.raises(BnprobeError, match="'val_loss_mc'"):
        plot_curves(runs, metrics=["val_loss_mc"])
    with pytest.raises(BnprobeError, match="run folder not found"):
        plot_curves([tmp_path / "nope"])
    with pytest.raises(BnprobeError, match="2 runs"):
        plot_curves(runs, labels=["only one"])


def test_folder_summary_csv_is_reused_when_it_matches(tmp_path, meas, summary):
    folder = meas.save(tmp_path / "m")
    edited = summary.copy()
    edited["n_eff"] = 12345.0
    edited.to_csv(folder / "summary.csv", index=False)
    fig = plot_chi2(folder, layer=0)
    assert any("12345" in s for s in fig.axes[0].get_legend_handles_labels()[1])
    edited[edited["batch_size"] == 4].to_csv(folder / "summary.csv", index=False)  # stale: recomputed
    fig = plot_chi2(folder, layer=0)
    assert not any("12345" in s for s in fig.axes[0].get_legend_handles_labels()[1])
