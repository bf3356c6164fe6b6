import json

import pytest
from click.testing import CliRunner

from bnprobe.cli.main import cli
from bnprobe.training import TrainConfig, train


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bnrun")
    train(TrainConfig(dataset="synthetic", width=0.25, epochs=1, device="cpu"), out)
    return out


def test_evaluate_and_report(run_dir, tmp_path):
    code, text = _run("evaluate", run_dir, "--mc", "3,5", "--robustness", "--quiet")
    assert code == 0, text
    doc = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    assert doc["format"] == "bnprobe.evaluation" and doc["metrics"]["mc_mode"] == "mcbn"
    assert {"single", "mc3", "mc5"} <= set(doc["metrics"])
    assert (run_dir / "evaluation" / "robustness.csv").is_file()
    assert (run_dir / "evaluation" / "coverage.csv").is_file()
    code, text = _run("evaluate", run_dir, "--quiet")
    assert code == 2 and "already holds an evaluation" in text
    code, text = _run("report", run_dir, "--out", tmp_path / "r.md")
    assert code == 0, text
    assert "| BN" in (tmp_path / "r.md").read_text() and (tmp_path / "r.csv").is_file()


@pytest.mark.parametrize("args,needle", [
    (["--dataset", "cifar10"], "not on 'cifar10'"),
    (["--split", "train"], "not train"),
    (["--split", "nope"], "'nope'"),
    (["--mc", "0"], "at least 1"),
    (["--noise", "/nonexistent.json"], "not found"),
])
def test_evaluate_bad_inputs(run_dir, tmp_path, args, needle):
    code, text = _run("evaluate", run_dir, *args, "--out", tmp_path / "e", "--quiet")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], text


def test_report_without_evaluation(tmp_path):
    code, text = _run("report", tmp_path, "--out", tmp_path / "r.md")
    assert code == 2 and "bnprobe evaluate" in text
