"""The Monte Carlo loop: predictive distributions averaged over samples of a stochastic model."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..progress import progress_bar
from .samplers import Sampler

__all__ = ["mc_average", "mc_log_probs"]


def mc_average(logp_samples: Tensor) -> Tensor:
    """Log of the mean predictive probability over samples (not the mean of log-probs).

    Computes ``log(1/S * sum_s exp(logp_s)) = logsumexp_s(logp_s) - log S`` in float64, which
    is stable for very negative log-probabilities.

    Args:
        logp_samples: Log-probabilities, shape ``(S, N, K)`` with ``S >= 1``.

    Returns:
        Log-probabilities of shape ``(N, K)`` with the input's dtype and device.
    """
    if logp_samples.dim() != 3 or logp_samples.shape[0] == 0:
        raise ValueError(f"expected (S, N, K) with S >= 1, got {tuple(logp_samples.shape)}")
    n_samples = logp_samples.shape[0]
    out = torch.logsumexp(logp_samples.double(), dim=0) - math.log(n_samples)
    return out.to(logp_samples.dtype)


@torch.no_grad()
def mc_log_probs(
    model: nn.Module,
    batches: Callable[[], Iterable[Tensor]],
    sampler: Sampler,
    counts: Sequence[int],
    progress: bool = False,
) -> dict[int, Tensor]:
    """Monte Carlo predictive log-probabilities for several sample counts from one set of draws.

    Sample ``s`` calls the sampler's ``resample()`` once and then passes every batch through
    the model (so MCBN uses one training batch for the whole set, as in Teye et al.); the
    average over samples is kept as a running float64 ``logsumexp``, and the prefix of the
    first ``n`` samples is returned for each ``n`` in ``counts``. The result for ``n`` equals
    :func:`mc_average` of the first ``n`` samples.

    Args:
        model: Maps inputs to logits or log-probabilities (``log_softmax`` is applied).
        batches: Returns the input batches, in the same order on every call.
        sampler: The sampler (see :mod:`bnprobe.noise.samplers`).
        counts: Sample counts to report (each >= 1).
        progress: Show a progress bar.

    Returns:
        ``{n: log-probabilities (N, K)}`` in the model's output dtype.
    """
    wanted = sorted({int(n) for n in counts})
    if not wanted or wanted[0] < 1:
        raise ValueError(f"sample counts must be >= 1, got {list(counts)}")
    out: dict[int, Tensor] = {}
    total = None
    dtype = None
    with sampler.sampling(model) as resample:
        for s in progress_bar(range(1, wanted[-1] + 1), total=wanted[-1], enabled=progress,
                              desc=f"MC ({sampler.kind})"):
            resample()
            logp = torch.cat([torch.log_softmax(model(x), dim=1) for x in batches()])
            dtype = logp.dtype
            logp = logp.double()
            total = logp if total is None else torch.logaddexp(total, logp)
            if s in wanted:
                out[s] = (total - math.log(s)).to(dtype)
    return out
