import json
import math

import pytest
import torch

from bnprobe.errors import BnprobeError
from bnprobe.measure import fit_noise, measure
from bnprobe.models import AllCNN
from bnprobe.noise import NoiseSpec


@pytest.fixture(scope="module")
def measurements():
    model = AllCNN(num_classes=3, width=0.1)
    return measure(model, torch.randn(80, 3, 8, 8), [4, 16], samples=20,
                   generator=torch.Generator().manual_seed(0))


def test_fit_measured_batch_size(measurements, tmp_path):
    spec = fit_noise(measurements, 16)
    s = measurements.samples.query("batch_size == 16 and fraction == 1.0")
    for layer in spec.layers:
        rows = s[s["layer"] == layer["name"]]
        per_channel = rows.groupby("channel")["u"].var()
        assert layer["sigma_u"] == pytest.approx(math.sqrt(per_channel.mean()), rel=1e-9)
        assert layer["sigma_u_channels"] == pytest.approx(per_channel.pow(0.5).tolist(), rel=1e-9)
        assert layer["n"] == 16 * layer["spatial_size"]
    spec.save(tmp_path / "f.json")
    back = NoiseSpec.load(tmp_path / "f.json")
    assert back.layers == spec.layers and back.batch_size == 16
    doc = json.loads((tmp_path / "f.json").read_text())
    assert doc["format"] == "bnprobe.noise" and doc["version"] == 1 and doc["bnprobe_version"]


def test_unmeasured_batch_size_scales_as_one_over_k(measurements):
    at16, at64 = fit_noise(measurements, 16), fit_noise(measurements, 64)
    for a, b in zip(at16.layers, at64.layers):
        assert b["sigma_v"] == pytest.approx(a["sigma_v"] / 2)
        assert b["sigma_u"] == pytest.approx(a["sigma_u"] / 2)
        assert b["n_eff"] == pytest.approx(a["n_eff"] * 4)
    with pytest.raises(BnprobeError):
        fit_noise(measurements, 1)


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(version=9), "version"),
    (lambda d: d.pop("layers"), "layers"),
    (lambda d: d["layers"][0].pop("sigma_u"), "sigma_u"),
    (lambda d: d["layers"][0].update(sigma_v=-0.1), "sigma_v"),
    (lambda d: d["layers"][0].update(sigma_u=float("nan")), "sigma_u"),
    (lambda d: d["layers"][0]["sigma_u_channels"].append(0.1), "sigma_u_channels"),
    (lambda d: d["layers"][1]["sigma_v_channels"].__setitem__(0, float("inf")), "non-finite"),
])
def test_rejections(measurements, tmp_path, edit, message):
    doc = fit_noise(measurements, 16).to_dict()
    edit(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(BnprobeError, match=message):
        NoiseSpec.load(path)


def test_missing_and_malformed(tmp_path):
    with pytest.raises(BnprobeError, match="not found"):
        NoiseSpec.load(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(BnprobeError, match="not valid JSON"):
        NoiseSpec.load(tmp_path / "x.json")


def _synthetic_measurements(v_shift: float, u_scale: float = 1.0, seed: int = 0,
                            k: int = 8, z: int = 64, draws: int = 200, channels: int = 32):
    """Measurements of one layer whose V, U come from real Gaussian batches of n = k z values."""
    import numpy as np
    import pandas as pd

    from bnprobe.measure import Measurements
    from bnprobe.measure.measurements import FORMAT, LAYER_COLUMNS, VERSION

    rng = np.random.default_rng(seed)
    n = k * z
    v = np.empty((draws, channels))
    u = np.empty((draws, channels))
    for i in range(draws):
        x = rng.standard_normal((channels, n))  # mu = 0, sigma = 1
        v[i] = -x.mean(axis=1)
        u[i] = 1.0 / x.std(axis=1)
    draw, channel = np.meshgrid(np.arange(draws), np.arange(channels), indexing="ij")
    samples = pd.DataFrame({
        "layer": "conv1", "layer_index": 0, "channel": channel.ravel(), "batch_size": k,
        "spatial_size": z, "fraction": 1.0, "draw": draw.ravel(),
        "v": v.ravel() + v_shift, "u": u.ravel() * u_scale,
    })
    layers = pd.DataFrame([["conv1", 0, channels, z, 1e-5, 0.0, 1.0]], columns=LAYER_COLUMNS)
    reference = pd.DataFrame({"layer": "conv1", "channel": np.arange(channels), "mean": 0.0, "var": 1.0})
    meta = {"format": FORMAT, "version": VERSION, "config": {"mode": "synthetic"}}
    return Measurements(samples, layers, reference, meta)


def test_fit_flags_a_biased_v_but_keeps_n_eff():
    from bnprobe.measure import noise_flags

    biased = fit_noise(_synthetic_measurements(0.15), 8)
    layer = biased.layers[0]
    assert layer["n_eff"] == pytest.approx(512, rel=0.1)  # the uncentred fit gave ~ 42
    assert layer["v_bias_frac4"] == 1.0 and layer["v_bias_z"] > 30
    assert any(f.startswith("V biased: 100% of channels") for f in layer["flags"])
    assert not any(f.startswith("U mean") for f in layer["flags"])
    lines = noise_flags(biased)
    assert len(lines) == 1 and lines[0].startswith("layer conv1: V biased")

    clean = fit_noise(_synthetic_measurements(0.0), 8)
    assert clean.layers[0]["n_eff"] == pytest.approx(512, rel=0.1)
    assert clean.layers[0]["flags"] == [] and noise_flags(clean) == []
    for key in ("v_bias_z", "v_bias_frac4", "u_bias_z", "mean_u", "eu_model"):
        assert isinstance(clean.layers[0][key], float)


def test_fit_flags_u_off_the_model_and_round_trips(tmp_path):
    from bnprobe.measure import noise_flags

    spec = fit_noise(_synthetic_measurements(0.0, u_scale=1.1), 8)
    layer = spec.layers[0]
    assert layer["n_eff"] == pytest.approx(512, rel=0.1)
    assert layer["u_bias_z"] > 4
    assert layer["flags"] == [f"U mean off the model by {layer['u_bias_z']:.1f} SE (above)"]
    spec.save(tmp_path / "f.json")
    back = NoiseSpec.load(tmp_path / "f.json")
    assert back.layers == spec.layers and noise_flags(back) == noise_flags(spec)


def test_layer_flags_rules():
    from bnprobe.measure.fit import layer_flags

    ok = {"n_eff": 100.0, "sigma_v": 0.1, "sigma_u": 0.1, "v_bias_z": 0.7, "v_bias_frac4": 0.0,
          "u_bias_z": 1.0}
    assert layer_flags(ok) == []
    assert layer_flags({**ok, "v_bias_frac4": 0.45}) == ["V biased: 45% of channels |mean| > 4 SE"]
    assert layer_flags({**ok, "v_bias_frac4": 0.05}) == []
    assert layer_flags({**ok, "u_bias_z": -7.3}) == ["U mean off the model by 7.3 SE (below)"]
    assert layer_flags({**ok, "n_eff": 2.1}) == ["n_eff 2.1 < 4"]
    assert layer_flags({**ok, "n_eff": float("nan"), "u_bias_z": None}) == [
        "non-finite: n_eff, u_bias_z", "broken: non-finite sigma or n_eff"]
    assert layer_flags({**ok, "n_eff": 1.5}) == ["n_eff 1.5 < 4", "broken: n_eff 1.5 < 2"]
    assert layer_flags({"n_eff": 50.0, "sigma_v": 0.1, "sigma_u": 0.1}) == []  # old files


def test_noise_file_flags_must_be_strings(measurements, tmp_path):
    doc = fit_noise(measurements, 16).to_dict()
    doc["layers"][0]["flags"] = "bad"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(BnprobeError, match="flags"):
        NoiseSpec.load(path)


def test_cli_fit_prints_warnings(tmp_path):
    from click.testing import CliRunner

    from bnprobe.cli.main import cli

    _synthetic_measurements(0.15, draws=100).save(tmp_path / "m")
    out = tmp_path / "fitted.json"
    result = CliRunner().invoke(cli, ["fit", str(tmp_path / "m"), "--batch-size", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Warning: layer conv1: V biased: 100% of channels |mean| > 4 SE" in result.stderr
    assert json.loads(out.read_text())["layers"][0]["flags"]
