"""Loss and accuracy of a model on a set of images, in evaluation mode."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..data.batches import DeviceImages
from ..noise.mc import mc_log_probs
from ..noise.samplers import InjectedNoise


@torch.no_grad()
def loss_and_accuracy(
    model: nn.Module,
    images: DeviceImages,
    index: torch.Tensor | None = None,
    batch_size: int = 500,
) -> tuple[float, float]:
    """Mean NLL and accuracy in evaluation mode; the model's training flag is restored.

    Args:
        model: A model returning log-probabilities or logits.
        images: The set.
        index: Restrict to these indices (default: all).
        batch_size: Evaluation batch size.

    Returns:
        ``(loss, accuracy)``; ``(nan, nan)`` for an empty set.
    """
    if index is None:
        index = torch.arange(len(images))
    batches = (images.batch(index[s : s + batch_size]) for s in range(0, len(index), batch_size))
    return _nll_and_accuracy(model, batches, len(index), lambda x: F.log_softmax(model(x), dim=1))


def _nll_and_accuracy(model: nn.Module, batches: Any, n: int, log_probs: Any) -> tuple[float, float]:
    """Mean NLL and accuracy of ``log_probs(x)`` over ``batches`` in eval mode (flag restored)."""
    if n == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    loss = correct = None
    try:
        for x, y in batches:
            logp = log_probs(x)
            batch_loss = F.nll_loss(logp, y, reduction="sum").double()
            batch_correct = (logp.argmax(1) == y).sum()
            loss = batch_loss if loss is None else loss + batch_loss
            correct = batch_correct if correct is None else correct + batch_correct
    finally:
        model.train(was_training)
    return loss.item() / n, correct.item() / n


@torch.no_grad()
def mc_loss_and_accuracy(
    model: nn.Module,
    images: DeviceImages,
    n_samples: int,
    generator: torch.Generator | None = None,
    batch_size: int = 500,
) -> tuple[float, float]:
    """Monte-Carlo NLL and accuracy of a model with noise modules (its injected noise on).

    The Monte Carlo loop of ``evaluate`` (:func:`bnprobe.noise.mc.mc_log_probs` with the
    :class:`~bnprobe.noise.samplers.InjectedNoise` sampler): the predictive distribution is
    the mean of the sampled class probabilities. The model's flags and generators are restored.

    Args:
        model: A model with noise modules.
        images: The set.
        n_samples: Forward passes over the set.
        generator: Generator of the noise draws (None: the modules' own).
        batch_size: Evaluation batch size.

    Returns:
        ``(loss, accuracy)``; ``(nan, nan)`` for an empty set.
    """
    if len(images) == 0:
        return float("nan"), float("nan")

    def inputs():
        return (x for x, _ in images.iterate(batch_size))

    logp = mc_log_probs(model, inputs, InjectedNoise(generator), [n_samples])[n_samples]
    return _nll_and_accuracy(model, [(logp, images.labels)], len(images), lambda lp: lp)
