"""Build models by architecture name: ``allcnn`` or ``torchvision:<name>``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import BnprobeError

TORCHVISION_PREFIX = "torchvision:"


def build_model(arch: str, kwargs: dict[str, Any] | None = None, seed: int | None = None) -> nn.Module:
    """Build a model with freshly initialized weights.

    Args:
        arch: ``allcnn`` or ``torchvision:<name>`` (e.g. ``torchvision:resnet18``; no
            pretrained weights are loaded).
        kwargs: Architecture keyword arguments (``num_classes``, ``in_channels``, ``width``,
            ``norm`` for allcnn; ``num_classes`` for torchvision models).
        seed: Seed for the initialization, applied inside ``torch.random.fork_rng`` so the
            global RNG state is left as it was.

    Returns:
        The model, in training mode.
    """
    kwargs = dict(kwargs or {})
    if seed is None:
        return _build(arch, kwargs)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return _build(arch, kwargs)


def _build(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    if arch == "allcnn":
        from .allcnn import AllCNN

        try:
            return AllCNN(**kwargs)
        except TypeError as exc:
            raise BnprobeError(f"bad arguments for allcnn: {exc}") from exc
    if arch.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(arch[len(TORCHVISION_PREFIX) :], kwargs)
    raise BnprobeError(f"unknown architecture {arch!r}; use allcnn or torchvision:<name>")


def _build_torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as exc:
        raise BnprobeError(f"unknown torchvision model {name!r}") from exc
    in_channels = kwargs.pop("in_channels", 3)
    if in_channels != 3:
        raise BnprobeError(f"torchvision:{name} takes 3 input channels, the data has {in_channels}: "
                           "train with --channels 3")
    kwargs.pop("width", None)
    kwargs.pop("norm", None)
    try:
        return builder(weights=None, **kwargs)
    except TypeError as exc:
        raise BnprobeError(f"bad arguments for torchvision:{name}: {exc}") from exc


def default_arch_kwargs(arch: str, num_classes: int, in_channels: int, width: float, norm: str) -> dict:
    """Architecture keyword arguments for a dataset and the train options."""
    if arch == "allcnn":
        return {"num_classes": num_classes, "in_channels": in_channels, "width": width, "norm": norm}
    return {"num_classes": num_classes, "in_channels": in_channels}
