"""Training options, recorded in config.json and in every checkpoint."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import BnprobeError
from ..options import DatasetName, Norm, Optimizer

# Options that may differ when a run is resumed: they do not change the trajectory.
RESUMABLE_CHANGES = {"epochs", "device", "quiet"}


@dataclass
class TrainConfig:
    """Everything that determines a training run.

    Attributes:
        dataset: Dataset name.
        data_root: Dataset folder (None: the default for the dataset).
        image_size: Resize image-folder images to this size.
        arch: ``allcnn`` or ``torchvision:<name>``.
        width: All-CNN channel multiplier.
        norm: Normalization after each convolution.
        epochs: Number of epochs.
        lr: Initial learning rate.
        lr_decay_epochs: E such that the learning rate falls tenfold every E epochs
            (lr * gamma^epoch with gamma^E = 0.1).
        batch_size: Training batch size.
        momentum: Nesterov momentum.
        weight_decay: L2 weight decay.
        optimizer: ``sgd`` (Nesterov) or ``adam``.
        limit_train: Train on a random subset of this many images.
        augment: Random translation and flips during training.
        translate: Maximum translation in pixels.
        eval_train_size: Size of the fixed training subset on which the evaluation-mode
            training loss is logged.
        seed: Seed of the run (initialization, data order, augmentation).
        device: ``auto``, ``cpu`` or ``cuda``.
    """

    dataset: str = DatasetName.DIGITS.value
    data_root: str | None = None
    image_size: int | None = None
    arch: str = "allcnn"
    width: float = 1.0
    norm: str = Norm.BN.value
    epochs: int = 10
    lr: float = 0.05
    lr_decay_epochs: float = 600.0
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 0.0
    optimizer: str = Optimizer.SGD.value
    limit_train: int | None = None
    augment: bool = True
    translate: int = 2
    eval_train_size: int = 2000
    seed: int = 0
    device: str = "auto"

    def validate(self) -> TrainConfig:
        """Check every option, raising a BnprobeError that names the bad one."""
        self.dataset = DatasetName.parse(self.dataset, "dataset").value
        self.norm = Norm.parse(self.norm, "norm").value
        self.optimizer = Optimizer.parse(self.optimizer, "optimizer").value
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 2, f"--batch-size must be at least 2 for BN, got {self.batch_size}"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.lr_decay_epochs > 0, f"--lr-decay-epochs must be positive, got {self.lr_decay_epochs}"),
            (self.width > 0, f"--width must be positive, got {self.width}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.translate >= 0, f"--translate must be >= 0, got {self.translate}"),
            (self.eval_train_size >= 1, f"--eval-train-size must be positive, got {self.eval_train_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BnprobeError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dictionary of every option."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Rebuild from a dictionary, ignoring unknown keys."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def differences(self, other: TrainConfig) -> list[str]:
        """Names of options that differ from ``other`` and would change the run."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k not in RESUMABLE_CHANGES and a[k] != b.get(k)]


def lr_at(config: TrainConfig, epoch: int) -> float:
    """Learning rate of an epoch: lr * gamma^epoch with gamma^lr_decay_epochs = 0.1."""
    return config.lr * 0.1 ** (epoch / config.lr_decay_epochs)
