"""Batch normalization with a noise module between the normalization and the affine."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..noise.functional import noise_then_affine

__all__ = ["NoisyBatchNorm2d"]


class NoisyBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` computing ``noise(x_hat) * weight + bias``.

    It is a ``BatchNorm2d`` (same buffers, same parameter names, found by everything that
    looks for BN layers); only the noise module is inserted before the affine. With a noise
    module that ``provides_affine`` (``LearnedNoise``), the BN's own affine is disabled.

    Args:
        num_features: Channels.
        noise: The noise module applied to the normalized activations (None: none).
        eps: Added to the variance.
        momentum: Running-statistics momentum (None: cumulative average).
    """

    def __init__(
        self,
        num_features: int,
        noise: Optional[nn.Module],
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
    ) -> None:
        affine = not getattr(noise, "provides_affine", False)
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self.noise = noise

    def forward(self, x: Tensor) -> Tensor:
        """Normalize with batch (training) or running (eval) statistics, then noise, affine."""
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        x_hat = F.batch_norm(
            x, self.running_mean if track else None, self.running_var if track else None,
            None, None, use_batch, factor, self.eps,
        )  # fmt: skip
        return noise_then_affine(x_hat, self.weight, self.bias, self.noise)
