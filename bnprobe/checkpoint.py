"""Checkpoint format v1 ("bnprobe.checkpoint"): plain types and tensors, safe to load.

A checkpoint is a dict loadable with ``torch.load(path, weights_only=True)``::

    format, version, bnprobe_version,
    arch: {name, kwargs}, state_dict,
    data: DataSpec fields (name, root, mean, std, num_classes, input_shape, ...),
    config: the training options, epoch (epochs completed),
    optimizer: optimizer state_dict, rng: generator states, history: per-epoch metrics.

Foreign checkpoints (a plain ``state_dict``, or a dict holding one under ``state_dict`` or
``model``) load with an explicit architecture. Pickled modules need ``unsafe_load=True``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .data.spec import DataSpec
from .errors import BnprobeError
from .io import atomic_write, sha256_file
from .layout import CHECKPOINT
from .models.registry import build_model

FORMAT = "bnprobe.checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model ready to use plus what is known about it.

    Attributes:
        model: The model, in evaluation mode.
        arch: Architecture name.
        arch_kwargs: Architecture keyword arguments.
        data: The training data description (None for foreign checkpoints).
        config: Training options (empty for foreign checkpoints).
        path: Where it was read from.
        sha256: Hash of the file.
        payload: The raw dictionary (bnprobe checkpoints only).
    """

    model: nn.Module
    arch: str
    arch_kwargs: dict[str, Any]
    data: DataSpec | None
    config: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    sha256: str = ""
    payload: dict[str, Any] | None = None

    @property
    def is_bnprobe(self) -> bool:
        """Whether this is a bnprobe-format checkpoint."""
        return self.payload is not None


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a checkpoint atomically, adding the format header."""
    blob = {"format": FORMAT, "version": VERSION, "bnprobe_version": __version__, **payload}
    return atomic_write(path, lambda p: torch.save(blob, p))


def checkpoint_path(target: str | Path) -> Path:
    """The checkpoint file of ``target``: a run directory's checkpoint.pt, or ``target`` itself."""
    target = Path(target)
    return target / CHECKPOINT if target.is_dir() else target


def read_checkpoint(path: str | Path, unsafe_load: bool = False, map_location: Any = "cpu") -> Any:
    """Read a checkpoint file safely.

    Args:
        path: The file.
        unsafe_load: Allow unpickling arbitrary Python objects (only for trusted files).
        map_location: Where tensors are loaded.

    Returns:
        Whatever the file holds (a dict for bnprobe checkpoints and state_dicts).
    """
    path = Path(path)
    if not path.is_file():
        raise BnprobeError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=not unsafe_load)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            raise BnprobeError(
                f"{path} contains pickled Python objects (e.g. a whole nn.Module); "
                "rerun with --unsafe-load only if you trust its source"
            ) from exc
        raise BnprobeError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
    except Exception as exc:  # torch raises many types for files that are not checkpoints
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BnprobeError(f"{path} is not a readable PyTorch checkpoint ({first})") from exc


def _find_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict):
        if obj and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
            return obj
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return _find_state_dict(obj[key])
    return None


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}  # saved from DDP
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())
        if "size mismatch for " in msg:  # the first mismatch says enough
            msg = msg.split("size mismatch for ", 1)[1].split(". ", 1)[0]
        raise BnprobeError(f"{source} does not fit the architecture: {msg[:240]}{hint}") from exc
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {', '.join(result.missing_keys[:3])}")
        if result.unexpected_keys:
            parts.append(f"unexpected {', '.join(result.unexpected_keys[:3])}")
        raise BnprobeError(f"{source} does not fit the architecture: {'; '.join(parts)}")


def open_checkpoint(
    path: str | Path,
    arch: str | None = None,
    num_classes: int | None = None,
    unsafe_load: bool = False,
    device: torch.device | str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
) -> Checkpoint:
    """Load a checkpoint and build its model.

    Args:
        path: A bnprobe checkpoint or run directory (its checkpoint.pt), or a foreign
            state_dict (then ``arch`` is required).
        arch: Architecture of a foreign state_dict, e.g. ``torchvision:resnet18``.
        num_classes: Number of classes of a foreign state_dict (default: inferred from the
            last weight's first dimension, or 1000).
        unsafe_load: Allow pickled modules.
        device: Where to put the model (default CPU).
        arch_kwargs: More architecture arguments of a foreign state_dict (e.g. ``width`` of
            an All-CNN; its ``in_channels`` is read from the first convolution's weight).

    Returns:
        The checkpoint with its model in evaluation mode.
    """
    path = checkpoint_path(path)
    obj = read_checkpoint(path, unsafe_load=unsafe_load)
    digest = sha256_file(path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if obj.get("version") != VERSION:
            raise BnprobeError(f"{path}: checkpoint version {obj.get('version')} is not supported")
        try:
            arch_name, kwargs = obj["arch"]["name"], dict(obj["arch"]["kwargs"])
            state, data = obj["state_dict"], DataSpec.from_dict(obj["data"])
        except (KeyError, TypeError) as exc:
            raise BnprobeError(f"{path}: malformed bnprobe checkpoint (missing {exc})") from exc
        model = build_model(arch_name, kwargs)
        _load_weights(model, state, str(path))
        return Checkpoint(model.to(device).eval(), arch_name, kwargs, data,
                          dict(obj.get("config", {})), str(path), digest, obj)
    if isinstance(obj, nn.Module):
        name = f"module:{type(obj).__name__}"
        return Checkpoint(obj.to(device).eval(), name, {}, None, {}, str(path), digest, None)
    state = _find_state_dict(obj)
    if state is None:
        raise BnprobeError(f"{path} holds neither a bnprobe checkpoint nor a state_dict")
    if arch is None:
        raise BnprobeError(
            f"{path} is a plain state_dict: pass --arch (e.g. torchvision:resnet18) and --num-classes"
        )
    if num_classes is None:
        num_classes = _guess_num_classes(state)
    kwargs = {"num_classes": num_classes, **_inferred_kwargs(arch, state), **(arch_kwargs or {})}
    model = build_model(arch, kwargs)
    hint = " (pass the architecture's arguments: --width, --arch-kwarg KEY=VALUE)" if arch == "allcnn" else ""
    _load_weights(model, state, str(path), hint)
    return Checkpoint(model.to(device).eval(), arch, kwargs, None, {}, str(path), digest, None)


def foreign_arch_kwargs(width: float | None, arch_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``--width`` and ``--arch-kwarg KEY=VALUE`` as one dict of architecture arguments."""
    merged = dict(arch_kwargs or {})
    if width is not None:
        merged["width"] = width
    return merged


def _inferred_kwargs(arch: str, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture arguments a foreign All-CNN state_dict tells: input channels and width.

    The width is read from the first convolution (96 x width channels); ``--width`` overrides
    it for widths whose rounding makes that ambiguous.
    """
    if arch != "allcnn":
        return {}
    first = next((t for t in state.values() if isinstance(t, torch.Tensor) and t.dim() == 4), None)
    if first is None:
        return {}
    from .models.allcnn import LAYERS

    return {"in_channels": int(first.shape[1]), "width": int(first.shape[0]) / LAYERS[0][0]}


def _guess_num_classes(state: dict[str, torch.Tensor]) -> int:
    """The output size of the last 2-D weight or bias vector in the state_dict."""
    for key in reversed(list(state)):
        if key.endswith("bias") and state[key].dim() == 1:
            return int(state[key].shape[0])
    return 1000


def load_checkpoint(path: str | Path, **kwargs: Any) -> nn.Module:
    """Load a checkpoint and return its model in evaluation mode, ready to use.

    Args:
        path: The checkpoint file.
        **kwargs: Passed to ``open_checkpoint`` (arch, num_classes, unsafe_load, device).

    Returns:
        The model.
    """
    return open_checkpoint(path, **kwargs).model
