"""Completion markers, resume decisions and the --out checks of ``bnprobe study`` (no training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bnprobe.errors import BnprobeError
from bnprobe.study import load_study, step_state
from bnprobe.study.runner import Runner, check_out_dir, step_env, threads_per_job

STUDY = """
[defaults.train]
dataset = "digits"
epochs = 3

[[run]]
name = "bn"
command = "train"

[[run]]
name = "m"
command = "measure"
checkpoint = "bn"
"""


@pytest.fixture
def study(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(textwrap.dedent(STUDY))
    return load_study(path)


def _train_dir(root, epochs_done, epochs=3, checkpoint=True):
    run = root / "runs" / "bn-s0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": {"epochs": epochs}}))
    if epochs_done:
        rows = "\n".join(f"{e},0.1" for e in range(1, epochs_done + 1))
        (run / "metrics.csv").write_text(f"epoch,lr\n{rows}\n")
    if checkpoint:
        (run / "checkpoint.pt").write_bytes(b"x")
    return run


def test_training_markers(study, tmp_path):
    step = study.steps["bn-s0"]
    fresh = step_state(step, tmp_path)  # nothing there yet
    assert not fresh.done and not fresh.clean and not fresh.extra
    run = _train_dir(tmp_path, 1)
    state = step_state(step, tmp_path)
    assert not state.done and state.extra == ("--resume",) and "after epoch 1" in state.detail
    (run / "metrics.csv").write_text("epoch,lr\n1,0.1\n2,0.1\n3,0.1\n")
    assert step_state(step, tmp_path).done
    (run / "checkpoint.pt").unlink()
    (run / "metrics.csv").unlink()  # config.json only: killed in the first epoch
    state = step_state(step, tmp_path)
    assert not state.done and state.clean and not state.extra


def test_measure_and_evaluate_markers(study, tmp_path):
    measure, evaluate = study.steps["m-s0"], study.steps["bn-s0.evaluate"]
    out = tmp_path / measure.out
    (out / ".partial").mkdir(parents=True)
    assert step_state(measure, tmp_path).extra == ("--resume",)
    (out / ".partial").rmdir()
    (out / "meta.json").write_text("{}")  # killed between meta.json and fitted.json
    assert step_state(measure, tmp_path).clean
    (out / "fitted.json").write_text("{}")
    assert step_state(measure, tmp_path).done
    ev = tmp_path / evaluate.out
    ev.mkdir(parents=True)
    (ev / "coverage.csv").write_text("")
    assert step_state(evaluate, tmp_path).clean
    (ev / "metrics.json").write_text("{}")
    assert step_state(evaluate, tmp_path).done


def test_out_dir_rules(study, tmp_path):
    root = tmp_path / "out"
    assert check_out_dir(root, study, resume=False) is None
    root.mkdir()
    assert check_out_dir(root, study, resume=False) is None  # empty is fine
    (root / "mine.txt").write_text("user data")
    with pytest.raises(BnprobeError, match="not empty; pass --resume"):
        check_out_dir(root, study, resume=False)
    with pytest.raises(BnprobeError, match="holds no study.json"):
        check_out_dir(root, study, resume=True)
    signature = study.steps["bn-s0"].signature(study.steps)
    state = {"format": "bnprobe.study", "steps": {"bn-s0": {"signature": signature}}}
    (root / "study.json").write_text(json.dumps(state))
    assert check_out_dir(root, study, resume=True)["steps"]["bn-s0"]["signature"] == signature
    state["steps"]["bn-s0"]["signature"] = [*signature[:-2], "--epochs", "9", *signature[-2:]]
    (root / "study.json").write_text(json.dumps(state))
    assert check_out_dir(root, study, resume=True)  # changed, but it has no outputs yet
    _train_dir(root, 1)
    with pytest.raises(BnprobeError, match="'bn-s0' changed since it ran"):
        check_out_dir(root, study, resume=True)
    assert (root / "mine.txt").read_text() == "user data"


def test_threads_are_split_between_jobs(monkeypatch, study, tmp_path):
    monkeypatch.setattr("bnprobe.study.runner.cpu_count", lambda: 16)
    assert [threads_per_job(j) for j in (1, 2, 3, 16, 32)] == [16, 8, 5, 1, 1]
    env = step_env(5)
    assert env["OMP_NUM_THREADS"] == "5" and env["MKL_NUM_THREADS"] == "5"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "123")
    assert step_env(1)["MALLOC_MMAP_THRESHOLD_"] == "123"  # the user's setting wins
    with pytest.raises(BnprobeError, match="--jobs"):
        Runner(study, tmp_path / "x", jobs=0)


FAILING = """
[defaults.train]
epochs = 1
width = 0.25
limit-train = 64
device = "cpu"

[[run]]
name = "bad"
command = "train"
options = { dataset = "imagefolder", data-root = "no-such-folder" }

[[run]]
name = "bad-noise"
command = "measure"
checkpoint = "bad"

[[run]]
name = "good"
command = "train"
options = { dataset = "digits" }
evaluate = false
"""


def test_a_failed_step_skips_its_dependents_only(tmp_path):
    path = tmp_path / "fail.toml"
    path.write_text(textwrap.dedent(FAILING))
    out = tmp_path / "out"
    repo = Path(__file__).resolve().parents[2]
    args = [sys.executable, "-m", "bnprobe", "study", str(path), "--out", str(out), "--jobs", "2"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    assert result.returncode == 2, result.stderr
    assert "FAILED  bad-s0  exit 2: Error: image folder not found: no-such-folder" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: 1 step(s) failed: bad-s0 (2 skipped after them)")
    state = json.loads((out / "study.json").read_text())
    status = {name: step["status"] for name, step in state["steps"].items()}
    assert status == {"bad-s0": "failed", "bad-s0.evaluate": "skipped", "bad-noise-s0": "skipped",
                      "good-s0": "done"}
    assert state["status"] == "failed" and not (out / "report.md").exists()
    assert (out / "runs" / "good-s0" / "checkpoint.pt").is_file()
