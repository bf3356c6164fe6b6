import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from bnprobe.cli.main import cli
from bnprobe.measure import fit_noise, measure
from bnprobe.models import AllCNN

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A real measurement folder (tiny AllCNN, random inputs) with fitted.json, and a run folder."""
    root = tmp_path_factory.mktemp("plotcli")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads only contend on a shared machine
    try:
        torch.manual_seed(0)
        model = AllCNN(num_classes=3, in_channels=3, width=0.1, norm="bn")
        m = measure(model, torch.randn(48, 3, 8, 8), [4, 16], samples=20, spatial_fractions=[0.5],
                    layers="0,3,5", generator=torch.Generator().manual_seed(0))  # spatial sizes 64, 16, 4
    finally:
        torch.set_num_threads(threads)
    meas_dir = m.save(root / "measurements")
    summary = m.summary(n_boot=20)  # as bnprobe measure does: summary.csv and fitted.json
    summary.to_csv(meas_dir / "summary.csv", index=False)
    fit_noise(m, 16, summary=summary).save(meas_dir / "fitted.json")
    run = root / "run_bn"
    run.mkdir()
    epochs = np.arange(1, 4)
    pd.DataFrame({"epoch": epochs, "train_loss": 1.0 / epochs, "train_eval_loss": 0.9 / epochs,
                  "val_loss": 1.1 / epochs, "val_acc": 0.3 * epochs}).to_csv(run / "metrics.csv", index=False)
    (run / "config.json").write_text(json.dumps({"config": {"norm": "bn"}}))
    return meas_dir, run


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.mark.parametrize("sub,extra", [
    ("chi2", ["--layer", "1", "--batch-size", "4"]),
    ("batch-scaling", []),
    ("spatial-scaling", []),
    ("noise", ["--pdf"]),
    ("curves", ["--metric", "train_loss", "--metric", "train_eval_loss"]),
])
def test_plot_subcommand_writes_its_figure(tmp_path, folders, sub, extra):
    meas_dir, run = folders
    source = {"noise": meas_dir / "fitted.json", "curves": run}.get(sub, meas_dir)
    out = tmp_path / "fig" / f"{sub}.png"
    code, output = _run("plot", sub, source, *extra, "--out", out)
    assert code == 0, output
    assert f"wrote {out}" in output
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    if "--pdf" in extra:
        assert out.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
        assert f"wrote {out.with_suffix('.pdf')}" in output


@pytest.mark.parametrize("args,needle", [
    (["plot", "chi2", "{tmp}/missing"], "measurements folder not found"),
    (["plot", "batch-scaling", "{tmp}/missing"], "measurements folder not found"),
    (["plot", "spatial-scaling", "{tmp}/missing"], "measurements folder not found"),
    (["plot", "noise", "{tmp}/missing.json"], "not found"),
    (["plot", "curves", "{tmp}/missing"], "run folder not found"),
    (["plot", "chi2", "{meas}", "--layer", "nope"], "unknown layer 'nope'"),
    (["plot", "chi2", "{meas}", "--batch-size", "64"], "batch size 64 was not measured"),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path, folders, args, needle):
    args = [a.format(tmp=tmp_path, meas=folders[0]) for a in args]
    code, output = _run(*args, "--out", tmp_path / "x.png")
    assert code == 2, output
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], output
    assert not (tmp_path / "x.png").exists()


def test_plot_module_imports_nothing_heavy():
    code = ("import sys, bnprobe.cli.plot; heavy = [m for m in ('torch', 'pandas', 'matplotlib', 'seaborn') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_lists_subcommands_and_overwriting():
    code, output = _run("plot", "--help")
    assert code == 0
    for sub in ("chi2", "batch-scaling", "spatial-scaling", "noise", "curves"):
        assert sub in output
    assert "overwritten" in output
