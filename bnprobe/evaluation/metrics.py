"""Classification metrics on log-probabilities: accuracy, NLL, ECE and Brier score.

All functions take log-probabilities ``logp`` of shape ``(N, K)`` and integer labels ``y`` of
shape ``(N,)`` on the same device, compute there in float64 and return Python floats.
"""

from __future__ import annotations

import torch

__all__ = ["accuracy", "brier", "ece", "nll", "summary_metrics"]


def _check(scores: torch.Tensor, y: torch.Tensor) -> None:
    """Raise ValueError unless ``scores`` is ``(N, K)`` with N >= 1 and ``y`` is ``(N,)``."""
    if scores.dim() != 2 or y.dim() != 1 or scores.shape[0] != y.shape[0]:
        raise ValueError(
            f"expected scores (N, K) and labels (N,), got {tuple(scores.shape)} and "
            f"{tuple(y.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError("metrics need at least one example")


def accuracy(logp: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of examples whose arg-max class equals the label.

    Args:
        logp: Log-probabilities (or any scores with the same arg-max), shape ``(N, K)``.
        y: Integer labels, shape ``(N,)``.

    Returns:
        The accuracy in [0, 1]. Ties in the arg-max go to the lowest class index.
    """
    _check(logp, y)
    return (logp.argmax(dim=1) == y).double().mean().item()


def nll(logp: torch.Tensor, y: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels.

    Args:
        logp: Log-probabilities, shape ``(N, K)`` (not re-normalized).
        y: Integer labels, shape ``(N,)``.

    Returns:
        ``-mean_i logp[i, y_i]``, accumulated in float64.
    """
    _check(logp, y)
    return -logp.double().gather(1, y.long()[:, None]).mean().item()


def brier(logp: torch.Tensor, y: torch.Tensor) -> float:
    """Multi-class Brier score: mean over examples of ``sum_k (p_k - onehot_k)^2``.

    Args:
        logp: Log-probabilities, shape ``(N, K)``.
        y: Integer labels, shape ``(N,)``.

    Returns:
        The Brier score in [0, 2].
    """
    _check(logp, y)
    p = logp.double().exp()
    onehot = torch.zeros_like(p).scatter_(1, y.long()[:, None], 1.0)
    return ((p - onehot) ** 2).sum(dim=1).mean().item()


def _to_probs(probs_or_logp: torch.Tensor) -> torch.Tensor:
    """Float64 probabilities: input with any negative entry is taken as log-probabilities."""
    scores = probs_or_logp.double()
    if bool((scores < 0).any()):
        return scores.exp()
    return scores


def ece(
    probs_or_logp: torch.Tensor, y: torch.Tensor, n_bins: int = 15, adaptive: bool = False
) -> float:
    """Expected calibration error with confidence = maximum class probability.

    ``ECE = sum_B |B| / N * |acc(B) - conf(B)|`` over the bins ``B`` (empty bins contribute 0).

    Bin conventions:

    * ``adaptive=False`` (equal width): edges ``k / n_bins`` for ``k = 0..n_bins``; bin ``b``
      holds confidences ``c`` with ``b / n_bins <= c < (b + 1) / n_bins``, so a confidence
      exactly on an inner edge goes to the upper bin; ``c = 1.0`` (and anything above it
      from rounding) goes to the last bin.
    * ``adaptive=True`` (equal mass): examples are sorted by confidence (stable sort, so
      ties keep input order) and split into ``n_bins`` consecutive groups with
      ``numpy.array_split`` sizes (the first ``N % n_bins`` groups get one extra example;
      groups are empty when ``N < n_bins``).

    Args:
        probs_or_logp: Probabilities or log-probabilities, shape ``(N, K)``. The input is
            treated as log-probabilities if any entry is negative, else as probabilities.
        y: Integer labels, shape ``(N,)``.
        n_bins: Number of bins (>= 1).
        adaptive: Use equal-mass bins instead of equal-width bins.

    Returns:
        The ECE in [0, 1].
    """
    _check(probs_or_logp, y)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs = _to_probs(probs_or_logp)
    conf, pred = probs.max(dim=1)
    correct = (pred == y).double()
    n = conf.shape[0]
    if adaptive:
        order = torch.sort(conf, stable=True).indices
        sizes = torch.full((n_bins,), n // n_bins, dtype=torch.long, device=conf.device)
        sizes[: n % n_bins] += 1
        ids = torch.repeat_interleave(torch.arange(n_bins, device=conf.device), sizes)
        bins = torch.empty_like(ids)
        bins[order] = ids
    else:
        edges = torch.arange(n_bins + 1, dtype=torch.float64, device=conf.device) / n_bins
        bins = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    gap = torch.zeros(n_bins, dtype=torch.float64, device=conf.device)
    gap.index_add_(0, bins, correct - conf)
    return (gap.abs().sum() / n).item()


def summary_metrics(logp: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """All metrics of this module with their default settings.

    Args:
        logp: Log-probabilities, shape ``(N, K)``.
        y: Integer labels, shape ``(N,)``.

    Returns:
        A dict with keys ``accuracy``, ``nll``, ``ece`` (15 equal-width bins),
        ``ece_adaptive`` (15 equal-mass bins) and ``brier``.
    """
    return {
        "accuracy": accuracy(logp, y),
        "nll": nll(logp, y),
        "ece": ece(logp, y),
        "ece_adaptive": ece(logp, y, adaptive=True),
        "brier": brier(logp, y),
    }
