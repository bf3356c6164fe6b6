"""Learning-rate search in log10 space: a coarse grid bracket, then golden-section refinement."""

from __future__ import annotations

import math
from typing import Callable

__all__ = ["choose", "search_lr"]

_INV_PHI2 = (3.0 - math.sqrt(5.0)) / 2.0  # 0.381966..., the golden-section fraction


def _clean(value: float) -> float:
    value = float(value)
    return math.inf if math.isnan(value) else value


def _best_index(points: list[tuple[float, float]]) -> int:
    # Points are sorted by x; ties go to the smaller learning rate.
    return min(range(len(points)), key=lambda i: (points[i][1], points[i][0]))


def _eligible(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Finite points (sorted by x) whose next larger evaluated point did not diverge."""
    return [p for i, p in enumerate(points)
            if math.isfinite(p[1]) and not (i + 1 < len(points) and math.isinf(points[i + 1][1]))]


def choose(history: list[tuple[float, float]], lo: float) -> float:
    """The chosen log10 learning rate of a search history, backing off from divergence.

    The best (lowest, ties to the smaller rate) point whose next larger evaluated neighbour
    did not diverge. When every finite point sits right below a divergent one, the rate one
    step (the gap to that neighbour) below the smallest finite point, but not below ``lo``;
    when everything diverged, ``lo``.

    Args:
        history: ``(log10_lr, value)`` pairs (NaN already recorded as ``inf``).
        lo: Smallest log10 learning rate of the search.

    Returns:
        The log10 learning rate.
    """
    points = sorted(history)
    safe = _eligible(points)
    if safe:
        return min(safe, key=lambda p: (p[1], p[0]))[0]
    finite = [i for i, p in enumerate(points) if math.isfinite(p[1])]
    if not finite:
        return lo
    i = finite[0]
    return max(lo, points[i][0] - (points[i + 1][0] - points[i][0]))


def search_lr(
    objective: Callable[[float], float],
    lo: float = -4.0,
    hi: float = 0.0,
    evaluations: int = 8,
    tol: float = 0.05,
) -> tuple[float, list[tuple[float, float]]]:
    """Minimize ``objective(log10_lr)`` over ``[lo, hi]`` with few evaluations.

    1. Bracketing: evaluate a uniform grid of ``max(3, evaluations // 3)`` points including
       both ends; the best point and its grid neighbours bracket the minimum.
    2. Golden section: repeatedly evaluate the point at the golden fraction (0.382) of the
       larger interval next to the current best point, inside the bracket formed by the best
       point's nearest evaluated neighbours (one-sided when the best point is ``lo`` or
       ``hi``), until the bracket is narrower than ``tol`` or ``evaluations`` calls are spent.

    NaN results (divergent learning rates) count as ``+inf``; ties go to the smaller learning
    rate, which is the safe side when large rates diverge. The result is chosen by
    :func:`choose`: never a rate whose next larger evaluated neighbour diverged (a rate just
    below the edge of divergence tends to diverge in a longer run). The search is
    deterministic and assumes a roughly unimodal objective.

    Args:
        objective: Maps a log10 learning rate to a loss (lower is better).
        lo: Smallest log10 learning rate.
        hi: Largest log10 learning rate.
        evaluations: Maximum number of objective calls (at least 3).
        tol: Stop when the bracket around the best point is at most this wide (log10 units).

    Returns:
        ``(chosen_log10_lr, history)``: the chosen point (see :func:`choose`) and the
        ``(log10_lr, value)`` pairs in evaluation order (NaN recorded as ``inf``).

    Raises:
        ValueError: For ``lo >= hi``, ``evaluations < 3`` or ``tol <= 0``.
    """
    if not lo < hi:
        raise ValueError(f"search_lr: need lo < hi, got lo={lo}, hi={hi}")
    if evaluations < 3:
        raise ValueError(f"search_lr: need at least 3 evaluations, got {evaluations}")
    if not tol > 0:
        raise ValueError(f"search_lr: tol must be positive, got {tol}")
    history: list[tuple[float, float]] = []

    def evaluate(x: float) -> None:
        history.append((x, _clean(objective(x))))

    grid = max(3, evaluations // 3)
    for i in range(grid):
        evaluate(lo + (hi - lo) * i / (grid - 1))
    while len(history) < evaluations:
        points = sorted(history)
        i = _best_index(points)
        x_best = points[i][0]
        left = points[i - 1] if i > 0 else None
        right = points[i + 1] if i + 1 < len(points) else None
        width = (right[0] if right else x_best) - (left[0] if left else x_best)
        if width <= tol:
            break
        left_len = x_best - left[0] if left else -1.0
        right_len = right[0] - x_best if right else -1.0
        if left_len > right_len or (left_len == right_len and left[1] <= right[1]):
            x_new = x_best - _INV_PHI2 * left_len
        else:
            x_new = x_best + _INV_PHI2 * right_len
        if any(abs(x_new - x) < 1e-12 for x, _ in history):
            break
        evaluate(x_new)
    return choose(history, lo), history
