"""Coverage and robustness figures from evaluation folders made by hand."""

import json

import numpy as np
import pandas as pd
import pytest

from bnprobe.errors import BnprobeError
from bnprobe.plots.evaluation import plot_coverage, plot_robustness


def _folder(root, name, norm, mc_mode, methods):
    d = root / name / "evaluation"
    d.mkdir(parents=True)
    doc = {"format": "bnprobe.evaluation", "label": "stale label",
           "source": {"config": {"norm": norm}}, "metrics": {"mc_mode": mc_mode}}
    (d / "metrics.json").write_text(json.dumps(doc))
    cov = np.linspace(0.1, 1.0, 10)
    rows = [{"method": m, "uncertainty": u, "coverage": c, "error": c * (0.3 + 0.1 * i), "n_accepted": 1}
            for i, m in enumerate(methods) for u in ("entropy", "max_prob") for c in cov]
    pd.DataFrame(rows).to_csv(d / "coverage.csv", index=False)
    rob = [{"attack": a, "strength": s, "accuracy": 0.9 - s} for a in ("gaussian", "fgsm") for s in (0, 0.1)]
    pd.DataFrame(rob).to_csv(d / "robustness.csv", index=False)
    return root / name


def _lines(fig):
    ax = fig.axes[0]
    return {ln.get_label(): ln.get_ydata() for ln in ax.get_lines()}


def test_coverage_mc_falls_back_to_single_for_a_deterministic_run(tmp_path):
    bn = _folder(tmp_path, "bn", "bn", "mcbn", ["single", "mc10"])
    wn = _folder(tmp_path, "wn", "wn", None, ["single", "mc1"])
    lines = _lines(plot_coverage([bn, wn], method="mc10"))
    assert set(lines) == {"BN (MC: MCBN) [bn]", "WN [wn] (deterministic: single pass)"}
    np.testing.assert_allclose(lines["BN (MC: MCBN) [bn]"], np.linspace(0.1, 1, 10) * 0.4)
    np.testing.assert_allclose(lines["WN [wn] (deterministic: single pass)"], np.linspace(0.1, 1, 10) * 0.3)


def test_coverage_of_a_missing_mc_method_in_a_stochastic_run_is_an_error(tmp_path):
    bn = _folder(tmp_path, "bn", "bn", "mcbn", ["single", "mc10"])
    with pytest.raises(BnprobeError, match="mc30"):
        plot_coverage([bn], method="mc30")


def test_robustness_labels_have_no_mc_suffix(tmp_path):
    bn = _folder(tmp_path, "bn", "bn", "mcbn", ["single"])
    fig = plot_robustness([bn], out=tmp_path / "r.png")
    assert set(_lines(fig)) == {"BN [bn]"} and (tmp_path / "r.png").is_file()
