"""The study report from hand-made run folders: means and spreads over seeds, tables, figures."""

from __future__ import annotations

import json
import math
import textwrap

import pandas as pd
import pytest

from bnprobe.study import load_study
from bnprobe.study.report import write_report

STUDY = """
[study]
name = "fake"
seeds = [0, 1]

[[run]]
name = "bn"
command = "train"
options = { norm = "bn" }

[[run]]
name = "meas"
command = "measure"
checkpoint = "bn"

[[run]]
name = "wn"
command = "train"
options = { norm = "wn" }
evaluate = false

[[run]]
name = "wn-x2"
command = "retrain"
noise = "meas"
options = { norm = "wn", noise-scale = 2.0 }

[[run]]
name = "an-learned"
command = "retrain"
label = "AN + learned noise"
options = { norm = "an", learn-noise = "channel" }

[report]
methods = ["wn-x2", "bn"]
"""

LAYERS = 3


def approx(value):
    return pytest.approx(value, rel=1e-5)  # report.csv keeps 6 significant digits


def _training(run, norm, seed, noise=None, scale=1.0, learn="off", val=1.0):
    run.mkdir(parents=True)
    config = {"norm": norm, "noise": noise, "noise_scale": scale, "learn_noise": learn, "epochs": 2}
    (run / "config.json").write_text(json.dumps({"config": config}))
    rows = []
    for epoch in (1, 2):
        row = {"epoch": epoch, "train_acc": 0.5 + 0.1 * seed, "train_eval_acc": 0.9,
               "val_acc": 0.6 + 0.1 * seed, "train_eval_loss": 0.3,
               "val_loss": val + 0.1 * seed + (0.5 if epoch == 1 else 0.0)}
        if learn != "off":
            row.update({f"sigma_rel_{i + 1}": 0.01 * (i + 1) * (1 + seed) for i in range(LAYERS)})
        if noise:
            row["val_loss_mc"] = row["val_loss"] - 0.01
        rows.append(row)
    pd.DataFrame(rows).to_csv(run / "metrics.csv", index=False)


def _evaluation(folder, seed, mode):
    folder.mkdir(parents=True)
    metrics = {"single": {"accuracy": 0.7 + 0.02 * seed, "nll": 0.9, "ece": 0.05}, "mc_mode": mode}
    if mode != "deterministic":
        metrics["mc10"] = {"accuracy": 0.72, "nll": 0.8 + 0.02 * seed, "ece": 0.04}
    doc = {"config": {"split": "test", "n": 100}, "metrics": metrics}
    (folder / "metrics.json").write_text(json.dumps(doc))


@pytest.fixture
def finished(tmp_path):
    path = tmp_path / "fake.toml"
    path.write_text(textwrap.dedent(STUDY))
    study = load_study(path)
    root = tmp_path / "out"
    runs = root / "runs"
    for seed in (0, 1):
        _training(runs / f"bn-s{seed}", "bn", seed, val=1.0)
        _evaluation(runs / f"bn-s{seed}" / "evaluation", seed, "mcbn")
        (runs / f"meas-s{seed}").mkdir(parents=True)
        layers = [{"sigma_u": 0.02 * (i + 1) + 0.01 * seed} for i in range(LAYERS)]
        (runs / f"meas-s{seed}" / "fitted.json").write_text(json.dumps({"batch_size": 32, "layers": layers}))
        _training(runs / f"wn-s{seed}", "wn", seed, val=1.4)
        _training(runs / f"wn-x2-s{seed}", "wn", seed, noise="fitted.json", scale=2.0, val=1.2)
        _evaluation(runs / f"wn-x2-s{seed}" / "evaluation", seed, "noise")
        _training(runs / f"an-learned-s{seed}", "an", seed, learn="channel", val=1.1)
        _evaluation(runs / f"an-learned-s{seed}" / "evaluation", seed, "noise")
    return study, root


def test_report_tables(finished):
    study, root = finished
    written = write_report(study, root)
    table = pd.read_csv(root / "report.csv")
    assert list(table["method"]) == ["wn-x2", "bn", "wn", "an-learned"]  # [report] methods first
    bn = table.set_index("method").loc["bn"]
    assert bn["n_seeds"] == 2 and bn["accuracy_mean"] == approx(0.71)
    assert bn["accuracy_std"] == approx(0.02 / math.sqrt(2))  # sample std of 0.70, 0.72
    assert bn["nll_mc_mean"] == approx(0.81)
    assert bn["val_loss_mean"] == approx(1.05) and bn["nll_gap_mean"] == approx(0.75)
    assert bn["acc_gap_mean"] == approx(0.9 - 0.65)
    wn = table.set_index("method").loc["wn"]
    assert math.isnan(wn["accuracy_mean"]) and wn["val_loss_mean"] == approx(1.45)  # not evaluated
    learned = table.set_index("method").loc["an-learned"]
    assert learned["sigma_rel_3_mean"] == approx(0.045)
    runs = pd.read_csv(root / "runs.csv")
    assert len(runs) == 8 and set(runs.loc[runs["method"] == "wn-x2", "noise_scale"]) == {2.0}
    md = written.markdown
    assert (root / "report.md").read_text() == md
    assert "| bn | 2 | mcbn | 0.7100 ± 0.0141 |" in md
    assert "| wn | 2 |  | — | — |" in md
    assert "| AN + learned noise | 0.015 ± 0.00707 |" in md
    assert "| meas: BN's measured σ_U (k = 32) | 0.025 ± 0.00707 |" in md
    assert "Test set (100 images)" in md


def test_report_figures(finished):
    study, root = finished
    written = write_report(study, root)
    names = sorted(p.name for p in written.files if p.suffix == ".png")
    assert names == ["study_learned_noise.png", "study_nll_epochs.png", "study_noise_scale.png"]
    for name in names:
        assert (root / "figures" / name).read_bytes()[:4] == b"\x89PNG"
