"""Uniform access to the inputs ``measure`` draws batches from."""

from __future__ import annotations

from typing import Any

import torch

from ..data.batches import DeviceImages
from ..errors import BnprobeError


class InputSource:
    """Random batches without replacement from a DeviceImages set, a Dataset or a Tensor.

    Args:
        data: ``DeviceImages`` (augmented draws when ``augment``), a torch Dataset whose items
            are ``(x, y)`` or ``x``, or a Tensor of inputs (N, ...).
        device: Where batches go.
        augment: Apply the training augmentation (DeviceImages only).
    """

    def __init__(self, data: Any, device: torch.device, augment: bool = False) -> None:
        self.data = data
        self.device = device
        self.augment = augment and isinstance(data, DeviceImages)
        try:
            self.n = len(data)
        except TypeError as exc:
            raise BnprobeError("data must be a Dataset, a Tensor or DeviceImages") from exc
        if self.n == 0:
            raise BnprobeError("the data is empty")

    def __len__(self) -> int:
        return self.n

    def get(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The inputs at ``index`` on the device (augmented when configured)."""
        if isinstance(self.data, DeviceImages):
            return self.data.batch(index, self.augment, generator)[0]
        if torch.is_tensor(self.data):
            return self.data[index.to(self.data.device)].to(self.device)
        items = [self.data[int(i)] for i in index]
        xs = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
        return torch.stack([torch.as_tensor(x) for x in xs]).to(self.device)
