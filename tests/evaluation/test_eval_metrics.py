from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bnprobe.evaluation import accuracy, brier, ece, nll, summary_metrics


def _logp(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def _ece_loop(probs: np.ndarray, y: np.ndarray, n_bins: int, adaptive: bool) -> float:
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    n = len(y)
    if adaptive:
        order = np.argsort(conf, kind="stable")
        groups = np.array_split(order, n_bins)
    else:
        edges = [k / n_bins for k in range(n_bins + 1)]
        groups = []
        for b in range(n_bins):
            lo, hi = edges[b], edges[b + 1]
            members = []
            for i in range(n):
                if lo <= conf[i] < hi or (b == n_bins - 1 and conf[i] >= hi):
                    members.append(i)
            groups.append(np.array(members, dtype=int))
    total = 0.0
    for g in groups:
        if len(g) == 0:
            continue
        total += len(g) / n * abs(correct[g].mean() - conf[g].mean())
    return total


def test_accuracy_nll_brier_by_hand():
    probs = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5], [0.5, 0.4, 0.1]]
    y = torch.tensor([0, 2, 2, 1])
    logp = _logp(probs)
    assert accuracy(logp, y) == pytest.approx(0.5)
    expected_nll = -(math.log(0.7) + math.log(0.3) + math.log(0.5) + math.log(0.4)) / 4
    assert nll(logp, y) == pytest.approx(expected_nll, rel=1e-12)
    b0 = 0.3**2 + 0.2**2 + 0.1**2
    b1 = 0.1**2 + 0.6**2 + 0.7**2
    b2 = 0.25**2 + 0.25**2 + 0.5**2
    b3 = 0.5**2 + 0.6**2 + 0.1**2
    assert brier(logp, y) == pytest.approx((b0 + b1 + b2 + b3) / 4, rel=1e-12)


def test_perfect_and_worst_brier():
    y = torch.tensor([0, 1])
    assert brier(_logp([[1.0, 0.0], [0.0, 1.0]]), y) == pytest.approx(0.0)
    assert brier(_logp([[0.0, 1.0], [1.0, 0.0]]), y) == pytest.approx(2.0)


def test_metrics_accept_float32():
    logp = _logp([[0.9, 0.1], [0.3, 0.7]]).float()
    y = torch.tensor([0, 0])
    assert nll(logp, y) == pytest.approx(-(math.log(0.9) + math.log(0.3)) / 2, rel=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("n_bins", [15, 7, 1])
def test_ece_matches_loop(adaptive, n_bins):
    gen = torch.Generator().manual_seed(0)
    logits = 2.5 * torch.randn(500, 5, generator=gen, dtype=torch.float64)
    logp = torch.log_softmax(logits, dim=1)
    y = torch.randint(0, 5, (500,), generator=gen)
    expected = _ece_loop(logp.exp().numpy(), y.numpy(), n_bins, adaptive)
    assert ece(logp, y, n_bins=n_bins, adaptive=adaptive) == pytest.approx(expected, abs=1e-12)
    # probabilities give the same answer as log-probabilities
    got = ece(logp.exp(), y, n_bins=n_bins, adaptive=adaptive)
    assert got == pytest.approx(expected, abs=1e-12)


def test_ece_adaptive_uneven_split_and_few_examples():
    gen = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(23, 3, generator=gen, dtype=torch.float64), dim=1)
    y = torch.randint(0, 3, (23,), generator=gen)
    for n_bins in (4, 30):
        expected = _ece_loop(logp.exp().numpy(), y.numpy(), n_bins, True)
        assert ece(logp, y, n_bins=n_bins, adaptive=True) == pytest.approx(expected, abs=1e-12)


def test_ece_known_values():
    y = torch.zeros(10, dtype=torch.long)
    # all confidences 0.8, 8 of 10 correct -> perfectly calibrated
    probs = [[0.8, 0.2]] * 8 + [[0.2, 0.8]] * 2
    assert ece(_logp(probs), y) == pytest.approx(0.0, abs=1e-12)
    # equal-mass bins split tied confidences, so only a single bin keeps them together
    assert ece(_logp(probs), y, n_bins=1, adaptive=True) == pytest.approx(0.0, abs=1e-12)
    # one example per bin: 8 * |1 - 0.8| + 2 * |0 - 0.8| over 10
    assert ece(_logp(probs), y, n_bins=10, adaptive=True) == pytest.approx(0.32, abs=1e-12)
    # all confidences 0.9, half correct -> 0.4
    probs = [[0.9, 0.1]] * 5 + [[0.1, 0.9]] * 5
    assert ece(_logp(probs), y) == pytest.approx(0.4, abs=1e-12)
    assert ece(_logp(probs), y, n_bins=1, adaptive=True) == pytest.approx(0.4, abs=1e-12)


def test_ece_bin_edges():
    # 2 bins: [0, 0.5) and [0.5, 1]. Confidence exactly 0.5 goes to the upper bin, 1.0 to last.
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([1, 0])  # first is wrong (argmax 0), second right
    # one bin holding both: acc 0.5, conf 0.75 -> 0.25
    assert ece(probs, y, n_bins=2) == pytest.approx(0.25)
    # 4 bins: 0.5 in bin 2 (|0-0.5|), 1.0 in bin 3 (|1-1|) -> 0.5 * 0.5
    assert ece(probs, y, n_bins=4) == pytest.approx(0.25)
    probs = torch.tensor([[0.5, 0.5], [0.75, 0.25]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    # edge 0.5 joins 0.75 in the upper of 2 bins: acc 0.5, conf 0.625
    assert ece(probs, y, n_bins=2) == pytest.approx(0.125)
    # 3 bins [0,1/3),[1/3,2/3),[2/3,1]: separate -> 0.5*|1-0.5| + 0.5*|0-0.75|
    assert ece(probs, y, n_bins=3) == pytest.approx(0.625)


def test_summary_metrics_keys_and_values():
    logp = _logp([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    y = torch.tensor([0, 0, 0])
    out = summary_metrics(logp, y)
    assert set(out) == {"accuracy", "nll", "ece", "ece_adaptive", "brier"}
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["nll"] == pytest.approx(nll(logp, y))
    assert out["ece_adaptive"] == pytest.approx(ece(logp, y, adaptive=True))
    assert all(isinstance(v, float) for v in out.values())


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        nll(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
