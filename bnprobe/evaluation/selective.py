"""Selective prediction: uncertainty scores, risk-coverage curves and AURC."""

from __future__ import annotations

import enum
from typing import Optional, Union

import pandas as pd
import torch

from bnprobe.errors import BnprobeError

__all__ = ["Uncertainty", "aurc", "coverage_curve", "uncertainty"]


class Uncertainty(str, enum.Enum):
    """How to score the uncertainty of a prediction (higher = less certain)."""

    ENTROPY = "entropy"
    MAX_PROB = "max_prob"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Union[str, Uncertainty]) -> Uncertainty:
        """Convert ``value`` to a member, raising a BnprobeError naming it when invalid.

        Args:
            value: A member or its string value (case-insensitive).

        Returns:
            The enum member.
        """
        if isinstance(value, cls):
            return value
        text = str(value).strip().lower()
        for member in cls:
            if member.value == text:
                return member
        allowed = ", ".join(m.value for m in cls)
        raise BnprobeError(f"invalid uncertainty {value!r}; choose from {allowed}")


def uncertainty(logp: torch.Tensor, kind: Union[str, Uncertainty]) -> torch.Tensor:
    """Per-example uncertainty from log-probabilities.

    Args:
        logp: Log-probabilities, shape ``(N, K)``.
        kind: ``"entropy"`` (predictive entropy ``-sum_k p_k log p_k``, with ``0 log 0 = 0``)
            or ``"max_prob"`` (``1 - max_k p_k``).

    Returns:
        Float64 tensor of shape ``(N,)`` on the input's device.

    Raises:
        BnprobeError: If ``kind`` is not a valid uncertainty.
    """
    kind = Uncertainty.parse(kind)
    lp = logp.double()
    p = lp.exp()
    if kind is Uncertainty.ENTROPY:
        plogp = torch.where(p > 0, p * lp, torch.zeros_like(p))
        return -plogp.sum(dim=1)
    return 1.0 - p.max(dim=1).values


def coverage_curve(
    logp: torch.Tensor, y: torch.Tensor, kind: Union[str, Uncertainty] = Uncertainty.MAX_PROB
) -> pd.DataFrame:
    """Risk-coverage curve: reject the most uncertain inputs first.

    Examples are ranked by increasing uncertainty with a stable sort (among ties, the
    earlier example is accepted first and rejected last). For each accepted count
    ``n = N, N-1, ..., 1`` the ``n`` most certain examples are accepted.

    Args:
        logp: Log-probabilities, shape ``(N, K)``.
        y: Integer labels, shape ``(N,)``.
        kind: Uncertainty score used for ranking.

    Returns:
        DataFrame with ``N`` rows (``n_accepted`` from ``N`` down to 1) and columns
        ``coverage`` (``n / N``), ``error`` (error rate among the accepted) and
        ``n_accepted``. The first row's error is the plain error rate.
    """
    if logp.dim() != 2 or y.shape != (logp.shape[0],) or logp.shape[0] == 0:
        raise ValueError(
            f"expected logp (N, K) with N >= 1 and labels (N,), got {tuple(logp.shape)} and "
            f"{tuple(y.shape)}"
        )
    u = uncertainty(logp, kind)
    order = torch.sort(u, stable=True).indices
    wrong = (logp.argmax(dim=1) != y).double()[order]
    n_total = wrong.shape[0]
    n_acc = torch.arange(1, n_total + 1, dtype=torch.float64, device=wrong.device)
    risk = torch.cumsum(wrong, dim=0) / n_acc
    n_np = n_acc.cpu().numpy()[::-1].astype("int64")
    return pd.DataFrame(
        {
            "coverage": n_np / n_total,
            "error": risk.cpu().numpy()[::-1],
            "n_accepted": n_np,
        }
    )


def aurc(
    curve_or_logp: Union[pd.DataFrame, torch.Tensor],
    y: Optional[torch.Tensor] = None,
    kind: Union[str, Uncertainty] = Uncertainty.MAX_PROB,
) -> float:
    """Area under the risk-coverage curve (discrete AURC of Geifman et al., 2019).

    ``AURC = (1 / N) * sum_{n=1}^{N} risk(n)`` where ``risk(n)`` is the error rate among the
    ``n`` most certain examples, i.e. the mean of the ``error`` column of
    :func:`coverage_curve`.

    Args:
        curve_or_logp: A DataFrame from :func:`coverage_curve`, or log-probabilities
            ``(N, K)``.
        y: Integer labels ``(N,)``; required with log-probabilities, must be None with a
            curve.
        kind: Uncertainty score (used only with log-probabilities).

    Returns:
        The AURC in [0, 1] (lower is better).
    """
    if isinstance(curve_or_logp, pd.DataFrame):
        if y is not None:
            raise ValueError("pass labels only with log-probabilities, not with a curve")
        curve = curve_or_logp
    else:
        if y is None:
            raise ValueError("labels y are required with log-probabilities")
        curve = coverage_curve(curve_or_logp, y, kind)
    if "error" not in curve.columns or len(curve) == 0:
        raise ValueError("the curve needs a non-empty 'error' column")
    return float(curve["error"].to_numpy(dtype="float64").mean())
