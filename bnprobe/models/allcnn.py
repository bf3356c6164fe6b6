"""All-CNN-C (Springenberg et al. 2015) as used in the paper's appendix."""

from __future__ import annotations

import torch
from torch import nn

from ..norms import make_conv_norm
from ..options import Norm

# (channels, kernel, stride) of each convolution; the last one has num_classes channels.
LAYERS = [
    (96, 3, 1), (96, 3, 1), (96, 3, 2),
    (192, 3, 1), (192, 3, 1), (192, 3, 2),
    (192, 3, 1), (192, 1, 1), (None, 1, 1),
]  # fmt: skip


class AllCNN(nn.Module):
    """All-CNN-C: nine convolutions, a normalization after each, global average pooling.

    3x3 convolutions use padding 1; leaky ReLU (slope 0.01) follows every convolution but the
    last; the output is log-softmax.

    Args:
        num_classes: Number of classes (channels of the last convolution).
        in_channels: Input image channels.
        width: Multiplier of every channel count but the last.
        norm: Normalization after each convolution.
        negative_slope: Leaky ReLU slope.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        norm: str | Norm = Norm.BN,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        self.norm_kind = Norm.parse(norm, "norm")
        layers: list[nn.Module] = []
        cin = in_channels
        for i, (channels, k, s) in enumerate(LAYERS):
            last = i == len(LAYERS) - 1
            cout = num_classes if last else max(1, int(round(channels * width)))
            layers.append(make_conv_norm(self.norm_kind, cin, cout, k, s, padding=k // 2))
            if not last:
                layers.append(nn.LeakyReLU(negative_slope))
            cin = cout
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the classes for a batch of images."""
        return torch.log_softmax(self.features(x).mean(dim=(2, 3)), dim=1)
