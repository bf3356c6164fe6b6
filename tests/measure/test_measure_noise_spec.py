import json
import math

import pytest
import torch

from bnprobe.errors import BnprobeError
from bnprobe.measure import NoiseSpec, fit_noise, measure
from bnprobe.models import AllCNN


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
