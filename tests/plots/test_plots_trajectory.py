"""``plot_noise_trajectory`` and ``bnprobe plot noise RUN_DIR...``: learned noise over the epochs."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bnprobe.cli.main import cli
from bnprobe.errors import BnprobeError
from bnprobe.plots import plot_noise_trajectory

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_dir(path, start, epochs=6, layers=3, learned=True):
    """A run folder whose sigma_rel_i goes geometrically from ``start`` to 0.1 * i."""
    path.mkdir()
    cols = ["sigma_rel_mean", *(f"sigma_rel_{i + 1}" for i in range(layers))] if learned else []
    lines = [",".join(["epoch", "lr", "train_loss", *cols])]
    for e in range(1, epochs + 1):
        values = [start * (0.1 * (i + 1) / start) ** (e / epochs) for i in range(layers)]
        row = [e, 0.01, 1.0 / e] + ([sum(values) / layers, *values] if learned else [])
        lines.append(",".join(map(str, row)))
    (path / "metrics.csv").write_text("\n".join(lines) + "\n")
    (path / "config.json").write_text(json.dumps({"config": {"norm": "an"}}))
    return path


def test_trajectory_of_two_starts(tmp_path):
    low, high = _run_dir(tmp_path / "low", 0.01), _run_dir(tmp_path / "high", 0.3)
    fig = plot_noise_trajectory([low, high], out=tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG_MAGIC
    over_time, profile = fig.axes[:2]
    assert len(over_time.get_lines()) >= 6 and over_time.get_yscale() == "log"
    labels = [t.get_text() for t in profile.get_legend().get_texts()]
    assert labels == ["low (an) (epoch 6)", "high (an) (epoch 6)"]
    last = profile.get_lines()[0].get_ydata()
    assert list(last) == pytest.approx([0.1, 0.2, 0.3])


def test_errors(tmp_path):
    plain = _run_dir(tmp_path / "plain", 0.1, learned=False)
    with pytest.raises(BnprobeError, match="no learned noise"):
        plot_noise_trajectory([plain])
    with pytest.raises(BnprobeError, match="2 labels for 1 runs"):
        plot_noise_trajectory([_run_dir(tmp_path / "r", 0.1)], labels=["a", "b"])
    with pytest.raises(BnprobeError, match="no run folders"):
        plot_noise_trajectory([])


def test_cli_plot_noise_with_run_folders(tmp_path):
    a, b = _run_dir(tmp_path / "a", 0.01), _run_dir(tmp_path / "b", 0.3)
    out = tmp_path / "fig.png"
    result = CliRunner().invoke(cli, ["plot", "noise", str(a), str(b), "--label", "0.01", "--label", "0.3",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == PNG_MAGIC and f"wrote {out}" in result.output
    mixed = CliRunner().invoke(cli, ["plot", "noise", str(a), str(tmp_path / "fitted.json")])
    assert mixed.exit_code == 2 and mixed.output.startswith("Error:") and "not a mix" in mixed.output
