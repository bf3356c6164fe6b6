from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from bnprobe.errors import BnprobeError
from bnprobe.evaluation import Uncertainty, aurc, coverage_curve, uncertainty


def _logp(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def test_uncertainty_values():
    logp = _logp([[0.5, 0.5], [1.0, 0.0], [0.7, 0.3]])
    ent = uncertainty(logp, "entropy")
    expected = [math.log(2), 0.0, -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))]
    assert ent.tolist() == pytest.approx(expected, abs=1e-12)
    assert uncertainty(logp, Uncertainty.MAX_PROB).tolist() == pytest.approx([0.5, 0.0, 0.3])


def test_uncertainty_enum_and_bad_value():
    assert Uncertainty("entropy") is Uncertainty.ENTROPY
    assert isinstance(Uncertainty.MAX_PROB, str)
    with pytest.raises(BnprobeError, match="variance"):
        uncertainty(_logp([[0.5, 0.5]]), "variance")


def _wrong(probs, y):
    return [int(np.argmax(p) != t) for p, t in zip(probs, y)]


def test_coverage_curve_endpoints():
    probs = [[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.55, 0.45], [0.3, 0.7]]
    y = torch.tensor([0, 1, 1, 1, 0])
    curve = coverage_curve(_logp(probs), y, "max_prob")
    assert list(curve.columns) == ["coverage", "error", "n_accepted"]
    assert curve["n_accepted"].tolist() == [5, 4, 3, 2, 1]
    assert curve["coverage"].tolist() == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    wrong = _wrong(probs, y.tolist())
    assert curve["error"].iloc[0] == pytest.approx(sum(wrong) / 5)
    # coverage 1/N keeps only the most certain example (confidence 0.9, correct)
    assert curve["error"].iloc[-1] == 0.0
    assert sum(wrong) == 3
    # most uncertain (0.55, wrong) is rejected first: 4 accepted, 2 of them wrong
    assert curve["error"].iloc[1] == pytest.approx(2 / 4)
    # then 0.6 (wrong): 3 accepted (0.9, 0.8, 0.7), 1 wrong
    assert curve["error"].iloc[2] == pytest.approx(1 / 3)


def test_coverage_curve_ties_stable():
    # equal confidence: the earlier example is accepted first
    probs = [[0.6, 0.4], [0.6, 0.4]]
    curve = coverage_curve(_logp(probs), torch.tensor([1, 0]), "entropy")
    assert curve["error"].tolist() == [0.5, 1.0]
    curve = coverage_curve(_logp(probs), torch.tensor([0, 1]), "entropy")
    assert curve["error"].tolist() == [0.5, 0.0]


def test_aurc_perfect_ranking_by_hand():
    # confidences decrease, the last 2 of 4 are wrong: risks at n=1..4 are 0, 0, 1/3, 1/2
    probs = [[0.95, 0.05], [0.85, 0.15], [0.75, 0.25], [0.65, 0.35]]
    y = torch.tensor([0, 0, 1, 1])
    expected = (0 + 0 + 1 / 3 + 1 / 2) / 4
    assert aurc(_logp(probs), y) == pytest.approx(expected)
    assert aurc(coverage_curve(_logp(probs), y, "entropy")) == pytest.approx(expected)
    # the reverse ranking is worse: risks 1, 1, 2/3, 1/2
    y_rev = torch.tensor([1, 1, 0, 0])
    assert aurc(_logp(probs), y_rev) == pytest.approx((1 + 1 + 2 / 3 + 1 / 2) / 4)


def _aurc_loop(u: np.ndarray, wrong: np.ndarray) -> float:
    order = sorted(range(len(u)), key=lambda i: (u[i], i))
    risks = []
    for n in range(1, len(u) + 1):
        accepted = order[:n]
        risks.append(sum(wrong[i] for i in accepted) / n)
    return sum(risks) / len(risks)


@pytest.mark.parametrize("kind", ["entropy", "max_prob"])
def test_aurc_matches_loop(kind):
    gen = torch.Generator().manual_seed(3)
    logp = torch.log_softmax(2 * torch.randn(200, 4, generator=gen, dtype=torch.float64), 1)
    y = torch.randint(0, 4, (200,), generator=gen)
    p = logp.exp().numpy()
    u = -(p * np.log(p)).sum(axis=1) if kind == "entropy" else 1 - p.max(axis=1)
    wrong = (p.argmax(axis=1) != y.numpy()).astype(float)
    assert aurc(logp, y, kind=kind) == pytest.approx(_aurc_loop(u, wrong), abs=1e-12)
    curve = coverage_curve(logp, y, kind)
    assert len(curve) == 200
    assert isinstance(curve, pd.DataFrame)


def test_aurc_argument_checks():
    logp = _logp([[0.9, 0.1]])
    with pytest.raises(ValueError):
        aurc(logp)
    with pytest.raises(ValueError):
        aurc(coverage_curve(logp, torch.tensor([0])), torch.tensor([0]))
