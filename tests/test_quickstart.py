import json
import math

import pandas as pd
import pytest

from bnprobe.errors import BnprobeError
from bnprobe.quickstart import run_quickstart


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    result = run_quickstart(out, device="cpu", progress=False)
    table = pd.read_csv(out / "report.csv")
    assert len(table) == 3
    numbers = table.drop(columns=["method", "run"])
    assert all(math.isfinite(v) for v in numbers.to_numpy().ravel())
    assert result.metrics["bn_test_accuracy"] >= 0.95
    for name in ("chi2", "batch_scaling", "spatial_scaling", "noise", "curves", "coverage"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 5000
    assert json.loads((out / "measurements" / "fitted.json").read_text())["batch_size"] == 32
    again = run_quickstart(out, device="cpu", progress=False)  # resumes: every stage reused
    assert again.metrics == result.metrics


def test_quickstart_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(BnprobeError, match="not a quickstart folder"):
        run_quickstart(tmp_path)
