import json

import pandas as pd
import pytest
import torch
import torchvision
from click.testing import CliRunner

from bnprobe.cli.main import cli
from bnprobe.training import TrainConfig, train


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(dataset="synthetic", width=0.25, epochs=1, device="cpu"), out)
    return out / "checkpoint.pt"


def test_measure_and_fit(checkpoint, tmp_path):
    out = tmp_path / "m"
    code, text = _run("measure", checkpoint, "--batch-sizes", "4,16", "--samples", "10",
                      "--spatial-fractions", "0.5", "--out", out, "--quiet")
    assert code == 0, text
    for name in ("samples.parquet", "layers.csv", "reference.parquet", "summary.csv", "fitted.json",
                 "meta.json"):
        assert (out / name).is_file()
    summary = pd.read_csv(out / "summary.csv")
    for col in ("var_v", "var_u", "n", "n_eff", "ks_stat", "ks_p", "slope_v", "slope_u"):
        assert col in summary.columns
    fitted = json.loads((out / "fitted.json").read_text())
    assert fitted["batch_size"] == 16  # 32 not measured: the middle batch size
    assert fitted["source"]["checkpoint_sha256"] and fitted["source"]["arch"] == "allcnn"
    assert "features.0.norm" in text
    code, text = _run("fit", out, "--batch-size", "32", "--out", tmp_path / "f.json")
    assert code == 0, text
    assert json.loads((tmp_path / "f.json").read_text())["batch_size"] == 32
    code, text = _run("fit", out, "--out", tmp_path / "f.json")
    assert code == 2 and "already exists" in text
    code, text = _run("measure", checkpoint, "--out", out, "--quiet")
    assert code == 2 and "already holds measurements" in text


def _one_error_line(code, text, needle):
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert code == 2, text
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], text


@pytest.mark.parametrize("args,needle", [
    (["--batch-sizes", "1,8"], "at least 2"),
    (["--batch-sizes", "8,,3"], "comma-separated"),
    (["--batch-sizes", ""], "comma-separated"),
    (["--batch-sizes", "100000"], "larger than the data"),
    (["--layers", "nope*"], "'nope*'"),
    (["--mode", "weird"], "'weird'"),
])
def test_measure_bad_options(checkpoint, tmp_path, args, needle):
    _one_error_line(*_run("measure", checkpoint, *args, "--out", tmp_path / "m", "--quiet"), needle)


def test_measure_bad_files(tmp_path):
    _one_error_line(*_run("measure", tmp_path / "missing.pt", "--out", tmp_path / "m"), "not found")
    (tmp_path / "text.pt").write_text("hello")
    _one_error_line(*_run("measure", tmp_path / "text.pt", "--out", tmp_path / "m"), "not a readable")
    _one_error_line(*_run("fit", tmp_path / "nothing", "--out", tmp_path / "f.json"), "not found")


def test_network_without_bn(tmp_path):
    train(TrainConfig(dataset="synthetic", width=0.25, epochs=1, norm="none", device="cpu"), tmp_path / "r")
    _one_error_line(*_run("measure", tmp_path / "r" / "checkpoint.pt", "--batch-sizes", "4",
                          "--out", tmp_path / "m", "--quiet"), "no BatchNorm")


def test_foreign_state_dict_and_pickled_module(tmp_path):
    model = torchvision.models.resnet18(num_classes=4)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    args = ["--dataset", "synthetic", "--batch-sizes", "4,8", "--samples", "3", "--quiet"]
    _one_error_line(*_run("measure", tmp_path / "sd.pt", *args, "--out", tmp_path / "a"), "--arch")
    code, text = _run("measure", tmp_path / "sd.pt", "--arch", "torchvision:resnet18", *args,
                      "--out", tmp_path / "b")
    assert code == 0, text
    code, text = _run("measure", tmp_path / "sd.pt", "--arch", "torchvision:resnet34", *args,
                      "--out", tmp_path / "c")
    _one_error_line(code, text, "does not fit")
    torch.save(model, tmp_path / "module.pt")
    _one_error_line(*_run("measure", tmp_path / "module.pt", *args, "--out", tmp_path / "d"), "--unsafe-load")
    code, text = _run("measure", tmp_path / "module.pt", "--unsafe-load", *args, "--out", tmp_path / "e")
    assert code == 0, text


def test_measure_refuses_an_interrupted_folder_without_resume(checkpoint, tmp_path):
    out = tmp_path / "m"
    (out / ".partial").mkdir(parents=True)
    _one_error_line(*_run("measure", checkpoint, "--batch-sizes", "4", "--samples", "3", "--out", out,
                          "--quiet"), "--resume")
    code, text = _run("measure", checkpoint, "--batch-sizes", "4", "--samples", "3", "--out", out,
                      "--quiet", "--resume")
    assert code == 0, text
    assert (out / "meta.json").is_file() and not (out / ".partial").exists()


def test_measure_accepts_a_run_directory(checkpoint, tmp_path):
    code, text = _run("measure", checkpoint.parent, "--batch-sizes", "4", "--samples", "3",
                      "--out", tmp_path / "m", "--quiet")
    assert code == 0, text
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    assert meta["source"]["checkpoint"].endswith("checkpoint.pt")
