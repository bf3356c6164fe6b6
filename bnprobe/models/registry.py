"""Build models by architecture name: ``allcnn`` or ``torchvision:<name>``.

A torchvision model is built with its own BN layers and, for ``norm`` ``wn``, ``an`` or
``none`` (or noise), converted by its graph (:func:`bnprobe.norms.convert.convert_bn_network`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import BnprobeError
from ..options import LearnNoise, Norm

TORCHVISION_PREFIX = "torchvision:"


def build_model(arch: str, kwargs: dict[str, Any] | None = None, seed: int | None = None) -> nn.Module:
    """Build a model with freshly initialized weights.

    Args:
        arch: ``allcnn`` or ``torchvision:<name>`` (e.g. ``torchvision:resnet18``; no
            pretrained weights are loaded).
        kwargs: Architecture keyword arguments: ``num_classes``, ``in_channels``, ``norm``,
            ``noise``, ``learn_noise``, ``prior_std`` (all optional), and ``width`` (allcnn
            only; ignored for torchvision). A torchvision model is built with BN and, for
            ``norm`` other than ``bn`` or with noise, converted by its graph (see
            :func:`bnprobe.norms.convert.convert_bn_network`).
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
    convert = {key: kwargs.pop(key) for key in _CONVERT_KWARGS if key in kwargs}
    try:
        model = builder(weights=None, **kwargs)
    except TypeError as exc:
        raise BnprobeError(f"bad arguments for torchvision:{name}: {exc}") from exc
    norm = Norm.parse(convert.pop("norm", Norm.BN), "norm")
    noisy = convert.get("noise") is not None or LearnNoise.parse(
        convert.get("learn_noise", LearnNoise.OFF), "learn-noise") is not LearnNoise.OFF
    if norm is Norm.BN and not noisy:
        return model
    from ..norms.convert import convert_bn_network

    return convert_bn_network(model, norm, inplace=True, where=f"torchvision:{name}", **convert)


_CONVERT_KWARGS = ("norm", "noise", "learn_noise", "prior_std")


def noise_layers(arch: str, kwargs: dict[str, Any]) -> tuple[list[str] | None, list[int]]:
    """The layers of a model that take noise: their names (None: by position) and channels.

    For allcnn the nine convolution blocks; for a torchvision model its BN layers in graph
    order (the layers that conversion replaces), read from a BN build on the ``meta`` device
    (no memory, no initialization cost) where the builder allows it.

    Args:
        arch: Architecture name.
        kwargs: Architecture keyword arguments (``num_classes``, ``width``).

    Returns:
        ``(names, channels)``.
    """
    if arch == "allcnn":
        from .allcnn import layer_channels

        return None, layer_channels(int(kwargs.get("num_classes", 10)), float(kwargs.get("width", 1.0)))
    from ..norms.tracing import bn_sites

    plain = {k: v for k, v in kwargs.items() if k not in _CONVERT_KWARGS}
    try:
        with torch.device("meta"):
            model = build_model(arch, plain)
    except (NotImplementedError, RuntimeError):  # a builder that reads tensor values (regnet)
        model = build_model(arch, plain)
    sites = bn_sites(model, arch)
    return [s.name for s in sites], [s.channels for s in sites]


def default_arch_kwargs(arch: str, num_classes: int, in_channels: int, width: float, norm: str) -> dict:
    """Architecture keyword arguments for a dataset and the train options."""
    if arch == "allcnn":
        return {"num_classes": num_classes, "in_channels": in_channels, "width": width, "norm": norm}
    return {"num_classes": num_classes, "in_channels": in_channels, "norm": norm}
