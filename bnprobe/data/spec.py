"""What a run records about its data, and the train/val/test sets built from it."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import BnprobeError
from ..options import DatasetName
from ._image_data import ImageData
from .batches import DeviceImages, Normalization
from .splits import SPLIT_SEED, VAL_FRACTION, train_val_split


def default_root(name: str) -> Path:
    """Default data folder of a dataset: ``$BNPROBE_DATA/<name>`` or ``./data/<name>``."""
    return Path(os.environ.get("BNPROBE_DATA", "data")) / name


def load_dataset(
    name: str | DatasetName,
    root: str | Path | None = None,
    download: bool = False,
    image_size: int | None = None,
    cache_dir: str | Path | None = None,
    channels: int | None = None,
) -> ImageData:
    """Load a dataset by name into memory.

    Args:
        name: ``digits``, ``cifar10``, ``imagefolder`` or ``synthetic``.
        root: Data folder (cifar10, imagefolder); defaults to ``data/<name>``.
        download: Download CIFAR-10 when missing (needs a network).
        image_size: Resize image-folder images to this size.
        cache_dir: Where image folders keep their decoded cache.
        channels: Convert the images to this many channels (1 <-> 3; None: as read).

    Returns:
        The dataset.
    """
    return _load(name, root, download, image_size, cache_dir).with_channels(channels)


def load_for_spec(spec: DataSpec, root: str | Path | None = None) -> ImageData:
    """Load the data a checkpoint was trained on, as it was trained on (channels, image size).

    Args:
        spec: The checkpoint's data description.
        root: Another folder holding the same data (default: the recorded root).

    Returns:
        The dataset.
    """
    channels, size = int(spec.input_shape[0]), list(spec.input_shape[1:])
    root = root if root is not None else spec.root
    data = load_dataset(spec.name, root, channels=channels)
    if list(data.input_shape[1:]) != size and spec.name == DatasetName.IMAGEFOLDER.value:
        data = load_dataset(spec.name, root, image_size=size[0], channels=channels)  # --image-size
    return data


def _load(name, root, download, image_size, cache_dir) -> ImageData:
    kind = DatasetName.parse(name, "dataset")
    if kind is DatasetName.DIGITS:
        from .digits import load_digits

        return load_digits()
    if kind is DatasetName.SYNTHETIC:
        from .synthetic import make_synthetic

        return make_synthetic()
    root = Path(root) if root is not None else default_root(kind.value)
    if kind is DatasetName.CIFAR10:
        from .cifar10 import load_cifar10

        return load_cifar10(root, download=download)
    from .imagefolder import load_imagefolder

    return load_imagefolder(root, image_size=image_size, cache_dir=cache_dir)


@dataclass
class DataSpec:
    """The data a model was trained on, as recorded in checkpoints and config files."""

    name: str
    root: str | None
    num_classes: int
    input_shape: list[int]
    mean: list[float]
    std: list[float]
    translate: int = 2
    flip: bool = True
    val_fraction: float = VAL_FRACTION
    split_seed: int = SPLIT_SEED
    fingerprint: str = ""
    classes: list[str] = field(default_factory=list)

    @classmethod
    def from_data(cls, data: ImageData, translate: int = 2, flip: bool | None = None,
                  **kwargs: Any) -> DataSpec:
        """Describe ``data`` with its training-set channel statistics.

        ``flip`` None takes the data's declared default (:attr:`ImageData.flip`).
        """
        mean, std = data.channel_stats()
        return cls(
            name=data.name, root=data.root, num_classes=data.num_classes,
            input_shape=list(data.input_shape), mean=mean, std=std, translate=translate,
            flip=data.flip if flip is None else flip, fingerprint=data.fingerprint,
            classes=list(data.classes), **kwargs,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        """Rebuild from ``to_dict`` output (unknown keys are ignored)."""
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dictionary."""
        return asdict(self)

    @property
    def normalization(self) -> Normalization:
        """Normalization and augmentation settings."""
        return Normalization(self.mean, self.std, self.translate, self.flip)


@dataclass
class Splits:
    """Train, validation and test sets on one device, normalized with the training statistics."""

    spec: DataSpec
    train: DeviceImages
    val: DeviceImages
    test: DeviceImages


def make_splits(
    data: ImageData,
    spec: DataSpec,
    device: torch.device | str = "cpu",
    limit_train: int | None = None,
    generator: torch.Generator | None = None,
) -> Splits:
    """Split ``data`` into train/validation (seeded by ``spec.split_seed``) and test sets.

    Args:
        data: The dataset.
        spec: Its description (normalization, split seed).
        device: Where the sets live.
        limit_train: Keep a random subset of this many training images.
        generator: CPU generator that picks the subset.

    Returns:
        The three sets.
    """
    if spec.fingerprint and data.fingerprint != spec.fingerprint:
        raise BnprobeError(
            f"dataset {data.name} at {data.root} differs from the one recorded (fingerprint mismatch)"
        )
    train_idx, val_idx = train_val_split(len(data.train_x), spec.val_fraction, spec.split_seed)
    if limit_train is not None:
        if limit_train < 1:
            raise BnprobeError(f"--limit-train must be positive, got {limit_train}")
        if limit_train < len(train_idx):
            pick = torch.randperm(len(train_idx), generator=generator)[:limit_train]
            train_idx = train_idx[pick.sort().values]
    norm = spec.normalization
    return Splits(
        spec=spec,
        train=DeviceImages(data.train_x[train_idx], data.train_y[train_idx], norm, device),
        val=DeviceImages(data.train_x[val_idx], data.train_y[val_idx], norm, device),
        test=DeviceImages(data.test_x, data.test_y, norm, device),
    )
