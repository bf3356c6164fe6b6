import json
import math

import pandas as pd
import pytest

from bnprobe.errors import BnprobeError
from bnprobe.quickstart import run_quickstart


def _check_outputs(out, result):
    table = pd.read_csv(out / "report.csv")
    assert len(table) == 3
    numbers = table.drop(columns=["method", "run"])
    assert all(math.isfinite(v) for v in numbers.to_numpy().ravel())
    for name in ("chi2", "batch_scaling", "spatial_scaling", "noise", "curves", "coverage"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 5000
    assert json.loads((out / "measurements" / "fitted.json").read_text())["batch_size"] == 32


def test_quickstart_pipeline_in_two_epochs(tmp_path):
    """Every stage, file and figure, and the resume, at 2 epochs a run (the full run is slow)."""
    out = tmp_path / "qs"
    result = run_quickstart(out, device="cpu", progress=False, epochs=2)
    _check_outputs(out, result)
    for run in ("bn", "wn_fitted_noise", "an_learned_noise"):
        assert len(pd.read_csv(out / run / "metrics.csv")) == 2
    again = run_quickstart(out, device="cpu", progress=False, epochs=2)  # resumes: every stage reused
    assert again.metrics == result.metrics
    with pytest.raises(BnprobeError, match="epochs must be at least 1"):
        run_quickstart(out, epochs=0)


@pytest.mark.slow
def test_quickstart_end_to_end_with_defaults(tmp_path):
    out = tmp_path / "qs"
    result = run_quickstart(out, device="cpu", progress=False)
    _check_outputs(out, result)
    assert result.metrics["bn_test_accuracy"] >= 0.95
    for run in ("bn", "wn_fitted_noise", "an_learned_noise"):
        assert len(pd.read_csv(out / run / "metrics.csv")) == 20
    again = run_quickstart(out, device="cpu", progress=False)  # resumes: every stage reused
    assert again.metrics == result.metrics


def test_quickstart_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(BnprobeError, match="not a quickstart folder"):
        run_quickstart(tmp_path)
