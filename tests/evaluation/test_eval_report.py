"""The report table from hand-made evaluation documents."""

import json
import math

import pandas as pd

from bnprobe.evaluation.report import write_report
from bnprobe.evaluation.run import metrics_table


def _doc(norm, mc_mode, metrics):
    return {"format": "bnprobe.evaluation", "version": 1, "label": "old",
            "source": {"config": {"norm": norm}}, "metrics": {"mc_mode": mc_mode, **metrics}}


def _m(acc, nll):
    return {"accuracy": acc, "nll": nll, "ece": 0.01, "aurc_entropy": 0.2}


def test_metrics_table_columns_and_values():
    docs = [_doc("bn", "mcbn", {"single": _m(0.5, 1.5), "mc10": _m(0.6, 1.0), "mc30": _m(0.61, 0.99)}),
            _doc("wn", None, {"single": _m(0.7, 0.8), "mc1": _m(0.7, 0.8)})]
    t = metrics_table(docs)
    assert list(t.columns) == ["method", "accuracy", "accuracy_mc10", "accuracy_mc30", "nll", "nll_mc10",
                               "nll_mc30", "ece", "aurc"]
    assert t.loc[0].tolist() == ["BN (MC: MCBN)", 0.5, 0.6, 0.61, 1.5, 1.0, 0.99, 0.01, 0.2]
    assert t.loc[1, "method"] == "WN" and math.isnan(t.loc[1, "nll_mc10"])


def test_report_marks_missing_mc_and_writes_csv(tmp_path):
    for name, doc in {"bn": _doc("bn", "mcbn", {"single": _m(0.5, 1.5), "mc10": _m(0.6, 1.0)}),
                      "wn": _doc("wn", None, {"single": _m(0.7, 0.8)})}.items():
        (tmp_path / name / "evaluation").mkdir(parents=True)
        (tmp_path / name / "evaluation" / "metrics.json").write_text(json.dumps(doc))
    md = write_report([tmp_path / "bn", tmp_path / "wn"], tmp_path / "r.md")
    assert "nll_mc30" not in md  # never evaluated: dropped
    wn_row = next(line for line in md.splitlines() if line.startswith("| WN"))
    assert "—" in wn_row and "nan" not in md
    assert "deterministic" in (tmp_path / "r.md").read_text()
    csv = pd.read_csv(tmp_path / "r.csv")
    assert csv["nll_mc10"].tolist()[0] == 1.0 and math.isnan(csv["nll_mc10"].tolist()[1])
