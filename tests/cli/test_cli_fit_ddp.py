"""``bnprobe fit --per-device-batch K --world-size W [--sync-bn]``: the noise of a multi-GPU set-up."""

import json
import re

import pytest
import torch
from click.testing import CliRunner

from bnprobe.cli.main import cli
from bnprobe.measure import Measurements, fit_device_noise, fit_noise, measure
from bnprobe.models import AllCNN


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("m")
    data = torch.randn(80, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    measure(AllCNN(num_classes=3, width=0.1), data, [4, 16], samples=20).save(out)
    return out


def test_device_noise_without_and_with_sync_bn(folder):
    m = Measurements.load(folder)
    spec, table = fit_device_noise(m, 4, 4, sync_bn=False)
    at4, at16 = fit_noise(m, 4), fit_noise(m, 16)
    assert spec.batch_size == 4 and [x["sigma_v"] for x in spec.layers] == [x["sigma_v"] for x in at4.layers]
    setup = {"per_device_batch": 4, "world_size": 4, "sync_bn": False, "global_batch": 16}
    assert {k: spec.source[k] for k in setup} == setup
    assert list(table["sigma_u_device"]) == [x["sigma_u"] for x in at4.layers]
    assert list(table["sigma_u_sync"]) == [x["sigma_u"] for x in at16.layers]
    assert (table["sigma_v_sync"] < table["sigma_v_device"]).all()  # SyncBN: less noise
    synced, _ = fit_device_noise(m, 4, 4, sync_bn=True)
    assert synced.batch_size == 16 and synced.source["sync_bn"] is True
    assert [x["sigma_v"] for x in synced.layers] == [x["sigma_v"] for x in at16.layers]


def test_cli_device_noise(folder, tmp_path):
    code, text = _run("fit", folder, "--per-device-batch", 4, "--world-size", 4, "--out", tmp_path / "a.json")
    assert code == 0, text
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["batch_size"] == 4
    setup = {"per_device_batch": 4, "world_size": 4, "sync_bn": False, "global_batch": 16}
    assert {k: doc["source"][k] for k in setup} == setup
    lines = text.splitlines()
    assert "4 processes x batch 4 (global batch 16)" in lines[0]
    assert "no SyncBN (k=4)" in lines[1] and "SyncBN (k=16)" in lines[1]
    rows = [ln for ln in lines if re.match(r"\s*\d+ features\.", ln)]
    assert len(rows) == len(doc["layers"])
    assert float(rows[0].split()[2]) == pytest.approx(doc["layers"][0]["sigma_v"], abs=1e-4)
    assert "not measured" not in text  # 4 and 16 were measured
    code, text = _run("fit", folder, "--per-device-batch", 8, "--world-size", 4, "--sync-bn",
                      "--out", tmp_path / "b.json")
    assert code == 0, text
    assert json.loads((tmp_path / "b.json").read_text())["batch_size"] == 32
    assert "batch size 8, 32 not measured" in text and "wrote" in text


@pytest.mark.parametrize("args,needle", [
    (["--batch-size", "8", "--per-device-batch", "8", "--world-size", "2"], "exclude each other"),
    (["--world-size", "2"], "--world-size describes a multi-GPU set-up"),
    (["--sync-bn"], "--sync-bn describes a multi-GPU set-up"),
    (["--per-device-batch", "8"], "needs --world-size"),
    (["--per-device-batch", "1", "--world-size", "2"], "--per-device-batch"),
    (["--per-device-batch", "8", "--world-size", "0"], "--world-size"),
])
def test_cli_device_noise_errors(folder, tmp_path, args, needle):
    code, text = _run("fit", folder, *args, "--out", tmp_path / "c.json")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], text
    assert not (tmp_path / "c.json").exists()
