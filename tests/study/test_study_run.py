"""``bnprobe study`` end to end on studies/digits-smoke.toml: --jobs 2, interrupted, --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bnprobe.cli.main import cli
from bnprobe.study import load_study

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "studies" / "digits-smoke.toml"


def _env():
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}


def _study(out, *extra, **kwargs):
    return subprocess.run([sys.executable, "-m", "bnprobe", "study", str(SMOKE), "--out", str(out),
                           "--jobs", "2", *extra], env=_env(), capture_output=True, text=True, **kwargs)


def _children_of(pid):
    """Processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "study"
    t0 = time.perf_counter()
    result = _study(out, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result, time.perf_counter() - t0


def test_smoke_study_end_to_end(uninterrupted):
    out, result, seconds = uninterrupted
    print(f"digits-smoke with --jobs 2: {seconds:.0f} s")
    study = load_study(SMOKE)
    state = json.loads((out / "study.json").read_text())
    assert state["status"] == "finished" and state["study"]["sha256"] == study.sha256
    assert {s["status"] for s in state["steps"].values()} == {"done"}
    assert set(state["steps"]) == set(study.steps)
    assert state["steps"]["bn-noise-s1"]["command"].startswith(f"bnprobe measure {out}/runs/bn-s1 ")
    assert (out / "study.toml").read_text() == SMOKE.read_text()
    assert "[study] digits-smoke: 26 steps, 0 already done, 26 to run" in result.stderr
    report = (out / "report.md").read_text()
    assert report in result.stdout
    for method in study.runs:
        if method != "bn-noise":
            assert f"| {method} | 2 |" in report
    assert "Learned noise σ_S/s per layer" in report
    for name in ("study_nll_epochs", "study_noise_scale", "study_learned_noise"):
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{name}.png" in report
    import pandas as pd

    table = pd.read_csv(out / "report.csv")
    assert list(table["method"]) == [m for m in study.runs if m != "bn-noise"]
    assert (table["n_seeds"] == 2).all()
    assert table.loc[table["method"] == "an-learned", "sigma_rel_9_mean"].notna().all()
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 12 and set(runs["seed"]) == {0, 1}

    # a finished study reruns nothing; without --resume its folder is refused
    again = _study(out, "--resume", timeout=300)
    assert again.returncode == 0, again.stderr
    assert "26 already done, 0 to run" in again.stderr and " start " not in again.stderr
    assert (out / "report.md").read_text() == report
    refused = CliRunner().invoke(cli, ["study", str(SMOKE), "--out", str(out)])
    assert refused.exit_code == 2 and "pass --resume" in refused.output


def test_interrupted_study_resumes_to_the_same_report(uninterrupted, tmp_path):
    reference, _, _ = uninterrupted
    out = tmp_path / "study"
    proc = subprocess.Popen([sys.executable, "-m", "bnprobe", "study", str(SMOKE), "--out", str(out),
                             "--jobs", "2"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    first = out / "runs" / "bn-s0" / "metrics.csv"  # epoch 1 of 2 of the first BN run is written
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    children = _children_of(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted; rerun with --resume" in stderr
    for pid in children:  # the running steps were stopped with it
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    state = json.loads((out / "study.json").read_text())
    assert state["status"] == "interrupted"
    statuses = {s["status"] for s in state["steps"].values()}
    assert "pending" in statuses
    print("after the interruption:",
          {n: s["status"] for n, s in state["steps"].items() if s["status"] != "pending"})

    result = _study(out, "--resume", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / "study.json").read_text())
    assert state["status"] == "finished" and len(state["sessions"]) == 2
    modes = {n: [a["mode"] for a in s["attempts"]] for n, s in state["steps"].items()}
    print("attempts:", {n: m for n, m in modes.items() if len(m) > 1})
    _assert_same_results(out, reference)


def _assert_same_results(out, reference):
    """Every number of the report equals the uninterrupted run's (training and evaluation are
    seeded, Monte Carlo draws included)."""
    import pandas as pd

    for name in ("report.csv", "runs.csv"):
        new, old = pd.read_csv(out / name), pd.read_csv(reference / name)
        pd.testing.assert_frame_equal(new, old, check_exact=True)
    assert (out / "report.md").read_text() == (reference / "report.md").read_text()


def test_noise_mc_evaluation_is_reproducible(uninterrupted, tmp_path):
    run = uninterrupted[0] / "runs" / "wn-noise-x2-s0"
    docs = []
    for i in range(2):
        args = ["evaluate", str(run), "--mc", "10", "--seed", "0", "--device", "cpu", "--quiet",
                "--out", str(tmp_path / str(i))]
        result = subprocess.run([sys.executable, "-m", "bnprobe", *args], env=_env(), capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        docs.append(json.loads((tmp_path / str(i) / "metrics.json").read_text())["metrics"])
    assert docs[0]["single"] == docs[1]["single"]
    assert docs[0]["mc10"] == docs[1]["mc10"]
