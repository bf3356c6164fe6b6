"""Loss and accuracy of a model on a set of images, in evaluation mode."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..data.batches import DeviceImages


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
    if len(index) == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    try:
        loss = torch.zeros((), dtype=torch.float64, device=images.device)
        correct = torch.zeros((), dtype=torch.long, device=images.device)
        for start in range(0, len(index), batch_size):
            x, y = images.batch(index[start : start + batch_size])
            out = model(x)
            loss += F.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
    finally:
        model.train(was_training)
    return loss.item() / len(index), correct.item() / len(index)


@torch.no_grad()
def mc_loss_and_accuracy(
    model: nn.Module,
    images: DeviceImages,
    n_samples: int,
    generator: torch.Generator | None = None,
    batch_size: int = 500,
) -> tuple[float, float]:
    """Monte-Carlo NLL and accuracy: eval mode with the noise on, probabilities averaged.

    Each batch goes ``n_samples`` times through the model inside
    :func:`bnprobe.norms.inject.mc_mode`; the predictive distribution is the mean of the
    sampled class probabilities. The model's flags and generators are restored.

    Args:
        model: A model with noise modules.
        images: The set.
        n_samples: Forward passes per batch.
        generator: Generator of the noise draws (None: the modules' own).
        batch_size: Evaluation batch size.

    Returns:
        ``(loss, accuracy)``; ``(nan, nan)`` for an empty set.
    """
    from ..evaluation.mc import mc_average
    from ..norms.inject import mc_mode

    if len(images) == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    try:
        loss = torch.zeros((), dtype=torch.float64, device=images.device)
        correct = torch.zeros((), dtype=torch.long, device=images.device)
        with mc_mode(model, generator):
            for x, y in images.iterate(batch_size):
                samples = torch.stack([F.log_softmax(model(x), dim=1) for _ in range(n_samples)])
                logp = mc_average(samples)
                loss += F.nll_loss(logp, y, reduction="sum").double()
                correct += (logp.argmax(1) == y).sum()
    finally:
        model.train(was_training)
    return loss.item() / len(images), correct.item() / len(images)
