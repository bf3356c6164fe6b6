"""All-CNN-C (Springenberg et al. 2015) as used in the paper's appendix."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..noise.network import build_noise_modules
from ..norms import make_conv_norm
from ..norms.an import InputMoments, propagate_sequence
from ..options import LearnNoise, Norm

# (channels, kernel, stride) of each convolution; the last one has num_classes channels.
LAYERS = [
    (96, 3, 1), (96, 3, 1), (96, 3, 2),
    (192, 3, 1), (192, 3, 1), (192, 3, 2),
    (192, 3, 1), (192, 1, 1), (None, 1, 1),
]  # fmt: skip


def layer_channels(num_classes: int = 10, width: float = 1.0) -> list[int]:
    """Output channels of the nine convolutions for a width and number of classes."""
    return [num_classes if c is None else max(1, int(round(c * width))) for c, _, _ in LAYERS]


class AllCNN(nn.Module):
    """All-CNN-C: nine convolutions, a normalization after each, global average pooling.

    3x3 convolutions use padding 1; leaky ReLU (slope 0.01) follows every convolution but the
    last; the output is log-softmax.

    With ``norm="an"`` the model holds ``input_moments`` (an :class:`InputMoments`: channel
    mean and variance of the normalized training inputs, filled by training and saved in the
    state_dict) and propagates them through the layers at the start of every forward, so the
    output is the same in training and evaluation mode and for any batch size.

    Args:
        num_classes: Number of classes (channels of the last convolution).
        in_channels: Input image channels.
        width: Multiplier of every channel count but the last.
        norm: Normalization after each convolution: none, bn, wn or an.
        negative_slope: Leaky ReLU slope.
        noise: Noise arguments (see :mod:`bnprobe.noise.network`): fixed noise after each
            normalization, or with ``learn_noise`` the initial sigma_S.
        learn_noise: ``off``, ``layer`` or ``channel``: learned multiplicative noise.
        prior_std: Prior std of learned noise.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        norm: str | Norm = Norm.BN,
        negative_slope: float = 0.01,
        noise: Optional[dict[str, Any]] = None,
        learn_noise: str | LearnNoise = LearnNoise.OFF,
        prior_std: float = 10.0,
    ) -> None:
        super().__init__()
        self.norm_kind = Norm.parse(norm, "norm")
        channels = layer_channels(num_classes, width)
        noises = build_noise_modules(channels, noise, learn_noise, prior_std)
        layers: list[nn.Module] = []
        cin = in_channels
        for i, ((_, k, s), cout) in enumerate(zip(LAYERS, channels)):
            layers.append(make_conv_norm(self.norm_kind, cin, cout, k, s, padding=k // 2,
                                         noise=noises[i]))
            if i < len(LAYERS) - 1:
                layers.append(nn.LeakyReLU(negative_slope))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.input_moments = InputMoments(in_channels) if self.norm_kind is Norm.AN else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the classes for a batch of images."""
        if self.input_moments is not None:
            m, v = self.input_moments()
            propagate_sequence(self.features, m, v)
        return torch.log_softmax(self.features(x).mean(dim=(2, 3)), dim=1)
