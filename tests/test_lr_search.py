from __future__ import annotations

import math

import pytest

from bnprobe.lr_search import choose, search_lr


class _Counter:
    def __init__(self, f):
        self.f, self.calls = f, []

    def __call__(self, x):
        self.calls.append(x)
        return self.f(x)


@pytest.mark.parametrize("center", [-2.3, -0.7, -3.6, -1.234])
def test_finds_minimum_of_parabola(center):
    f = _Counter(lambda x: (x - center) ** 2)
    best, history = search_lr(f, lo=-4.0, hi=0.0, evaluations=16, tol=0.05)
    assert abs(best - center) <= 0.05
    assert len(f.calls) == len(history) <= 16
    assert [h[0] for h in history] == f.calls
    assert all(-4.0 <= x <= 0.0 for x in f.calls)
    assert (best, (best - center) ** 2) in history
    assert min(v for _, v in history) == pytest.approx((best - center) ** 2)


def test_default_budget_is_respected_and_reasonably_accurate():
    f = _Counter(lambda x: (x + 2.3) ** 2)
    best, history = search_lr(f)
    assert len(history) <= 8
    assert abs(best + 2.3) < 0.15


def test_minimum_at_the_boundary():
    best, _ = search_lr(lambda x: -x, evaluations=16)  # decreasing: best at hi
    assert best == 0.0
    best, _ = search_lr(lambda x: x, lo=-3.0, hi=-1.0, evaluations=16)
    assert best == -3.0


def test_nan_and_inf_regions_count_as_infinite():
    def f(x):  # divergent learning rates above 10**-1 return nan
        return math.nan if x > -1.0 else (x + 1.5) ** 2

    best, history = search_lr(f, evaluations=16, tol=0.05)
    assert abs(best + 1.5) <= 0.05
    assert all(not math.isnan(v) for _, v in history)
    assert any(math.isinf(v) for _, v in history)

    def g(x):  # minimum right next to the divergent region
        return math.inf if x > -0.5 else (x + 0.8) ** 2

    best, history = search_lr(g, evaluations=16, tol=0.05)
    assert abs(best + 0.8) <= 0.05
    _assert_next_larger_did_not_diverge(best, history)


def _assert_next_larger_did_not_diverge(best, history):
    larger = [v for x, v in sorted(history) if x > best]
    assert not larger or math.isfinite(larger[0])


def test_never_picks_a_rate_whose_next_larger_neighbour_diverged():
    def f(x):  # best loss at the edge of divergence (like AN: 0.01 good, 0.0196 inf)
        return math.inf if x > -1.75 else -x

    best, history = search_lr(f, evaluations=6)
    assert min(history, key=lambda p: p[1])[0] != best  # the raw best was next to inf
    assert math.isfinite(f(best)) and best <= -1.75
    _assert_next_larger_did_not_diverge(best, history)


def test_choose_backs_off_one_step_when_every_rate_is_next_to_divergence():
    assert choose([(-4.0, 1.0), (-3.0, 0.5), (-2.0, math.inf)], -4.0) == -4.0
    assert choose([(-3.0, 0.5), (-2.5, math.inf), (-2.0, math.inf)], -4.0) == pytest.approx(-3.5)
    assert choose([(-4.0, 0.5), (-3.0, math.inf)], -4.0) == -4.0  # not below lo
    assert choose([(-4.0, math.inf), (-3.0, math.inf)], -4.0) == -4.0
    assert choose([(-2.0, 1.0), (-1.0, 0.9)], -4.0) == -1.0  # the largest rate has no neighbour


def test_deterministic_and_validates_arguments():
    f = lambda x: abs(x + 1.7) + 0.1 * math.sin(5 * x)  # noqa: E731
    assert search_lr(f, evaluations=10) == search_lr(f, evaluations=10)
    with pytest.raises(ValueError):
        search_lr(f, lo=0.0, hi=-1.0)
    with pytest.raises(ValueError):
        search_lr(f, evaluations=2)
    with pytest.raises(ValueError):
        search_lr(f, tol=0.0)
