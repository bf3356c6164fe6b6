"""``bnprobe retrain`` and the new ``bnprobe train`` options."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from bnprobe.checkpoint import open_checkpoint
from bnprobe.cli.main import cli
from bnprobe.models.allcnn import layer_channels


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def _fitted(path, width=0.25, layers=9, sigma_v=0.2, source=True):
    entries = []
    for i, c in enumerate(layer_channels(4, width)[:layers]):
        entries.append({"name": f"features.{2 * i}.norm", "index": i, "channels": c, "spatial_size": 16,
                        "n": 512, "n_eff": 400.0, "sigma_v": sigma_v, "sigma_u": 0.1,
                        "sigma_v_channels": [abs(sigma_v)] * c, "sigma_u_channels": [0.1] * c})
    doc = {"format": "bnprobe.noise", "version": 1, "batch_size": 32, "layers": entries,
           "source": {"arch": "allcnn", "arch_kwargs": {"width": width, "num_classes": 4},
                      "dataset": "synthetic", "data_root": None} if source else {}}
    path.write_text(json.dumps(doc))
    return path


FAST = ["--epochs", "1", "--limit-train", "48", "--batch-size", "16", "--device", "cpu", "--quiet",
        "--lr", "0.005", "--mc-samples", "2"]


def test_retrain_with_fitted_noise_uses_the_source(tmp_path):
    fitted = _fitted(tmp_path / "fitted.json")
    code, out = _run("retrain", "--noise", fitted, *FAST, "--out", tmp_path / "run")
    assert code == 0, out
    assert "wrote" in out
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    cfg = record["config"]
    assert (cfg["dataset"], cfg["arch"], cfg["width"], cfg["norm"]) == ("synthetic", "allcnn", 0.25, "wn")
    assert cfg["noise"] == str(fitted) and record["arch"]["kwargs"]["noise"]["sigma_v"][0][0] == 0.2
    ckpt = open_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt.arch_kwargs["noise"]["granularity"] == "layer"
    torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert "val_loss_mc" in (tmp_path / "run" / "metrics.csv").read_text()


def test_retrain_learned_noise_without_file_and_train_with_an(tmp_path):
    code, out = _run("retrain", "--norm", "an", "--learn-noise", "channel", "--dataset", "synthetic",
                     "--width", "0.25", *FAST, "--out", tmp_path / "learned")
    assert code == 0, out
    assert "sigma_rel_mean" in (tmp_path / "learned" / "metrics.csv").read_text()
    code, out = _run("train", "--norm", "an", "--dataset", "synthetic", "--width", "0.25", *FAST,
                     "--out", tmp_path / "an")
    assert code == 0, out
    assert open_checkpoint(tmp_path / "an" / "checkpoint.pt").arch_kwargs["norm"] == "an"


@pytest.mark.parametrize("make,extra,needle", [
    (lambda p: _fitted(p, layers=7), [], "7 layers but the network has 9"),
    (lambda p: _fitted(p, width=0.5), ["--width", "0.25"], "channels"),
    (lambda p: _fitted(p, sigma_v=-0.1), [], "negative"),
    (lambda p: p, [], "not found"),
    (lambda p: _fitted(p), ["--norm", "none", "--learn-noise", "layer"], "needs a normalization"),
    (lambda p: _fitted(p), ["--noise-granularity", "pixel"], "'pixel'"),
    (None, [], "--learn-noise"),
])
def test_retrain_bad_input_is_one_line_and_exit_2(tmp_path, make, extra, needle):
    noise = [] if make is None else ["--noise", make(tmp_path / "fitted.json")]
    code, out = _run("retrain", *noise, *extra, *FAST, "--out", tmp_path / "run")
    assert code == 2, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], out
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_train_rejects_learned_noise_with_norm_none(tmp_path):
    code, out = _run("train", "--norm", "none", "--learn-noise", "channel", *FAST, "--out", tmp_path / "r")
    assert code == 2 and "needs a normalization" in out


def test_retrain_noise_options_are_recorded_and_checked(tmp_path):
    noise = ["--noise-init", "0.2", "--noise-optimizer", "sgd", "--noise-lr", "0.1"]
    code, out = _run("retrain", "--norm", "an", "--learn-noise", "channel", "--dataset", "synthetic",
                     "--width", "0.25", *noise, *FAST, "--out", tmp_path / "run")
    assert code == 0, out
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert (cfg["noise_init"], cfg["noise_optimizer"], cfg["noise_lr"]) == (0.2, "sgd", 0.1)
    code, out = _run("train", "--norm", "wn", "--noise-lr", "0.1", *FAST, "--out", tmp_path / "bad")
    assert code == 2 and out.startswith("Error:") and "--learn-noise" in out
