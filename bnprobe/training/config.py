"""Training options, recorded in config.json and in every checkpoint."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import BnprobeError
from ..options import (
    DEFAULT_LR,
    DEFAULT_LR_CONVERTED_AN,
    LR_SEARCH_STEPS,
    LR_SEARCH_TRIALS,
    DatasetName,
    LearnNoise,
    NoiseGranularity,
    Norm,
    Optimizer,
)

# Options that may differ when a run is resumed: they do not change the trajectory.
RESUMABLE_CHANGES = {"epochs", "device", "quiet", "mc_every", "mc_samples", "lr_search_steps",
                     "lr_search_trials", "lr_auto"}
AUTO = "auto"


@dataclass
class TrainConfig:
    """Everything that determines a training run.

    Attributes:
        dataset: Dataset name.
        data_root: Dataset folder (None: the default for the dataset).
        image_size: Resize image-folder images to this size.
        channels: Convert the images to this many channels (1 <-> 3; None: as stored).
        arch: ``allcnn`` or ``torchvision:<name>``.
        width: All-CNN channel multiplier.
        norm: Normalization after each convolution: none, bn, wn or an.
        norm_batch: BN statistics over the training batch plus ``norm_batch - batch_size``
            other random training samples (None: the batch alone); bn only.
        project: Project scale-invariant weights to unit norm after every step (and exempt
            them from weight decay); None: on for normalized nets (resolved by ``validate``).
        data_init: Data-dependent init of the affine of none and wn nets (one BN pass).
        precise_bn: For nets with BN: before each validation, and in the saved checkpoint, the
            BN buffers hold the sequential population statistics (see
            :func:`bnprobe.measure.recalibrate`), not the running averages.
        precise_bn_size: Training images (a seeded subset) for ``precise_bn``; None: all.
        sync_bn: Under torchrun, BN normalizes by the statistics of the global batch (all
            processes); without it each process normalizes its own batch (bn only).
        noise: fitted.json whose noise is injected after every normalization (or whose
            sigma_u initializes learned noise).
        noise_granularity: ``layer`` or ``channel`` sigmas from the noise file.
        noise_scale: Factor on the noise file's sigmas (fixed noise, or the initial sigma_S of
            learned noise).
        learn_noise: ``off``, ``layer`` or ``channel``: learned multiplicative noise.
        noise_init: Initial sigma_S/s of every channel of learned noise (None: the noise
            file's sigma_u times ``noise_scale``, or 0.05 without a file).
        noise_optimizer: ``adam`` or ``sgd`` (Nesterov, ``momentum``) for the parameters of
            learned noise (u and s): a parameter group of their own, never weight-decayed,
            whose rate follows the learning-rate schedule by the same factor as the weights'.
        noise_lr: Initial learning rate of that group (None: ``NOISE_ADAM_LR`` with adam, the
            run's ``lr`` with sgd); training records the value it used.
        prior_std: Std of the N(1, prior_std^2) prior of learned noise.
        kl_weight: Weight of KL / train size in the loss of learned noise.
        epochs: Number of epochs.
        lr: Initial learning rate, ``"auto"`` (replaced by the searched value), or None: the
            default for the norm and optimizer (:data:`bnprobe.options.DEFAULT_LR`); training
            records the value it used.
        lr_auto: Whether ``lr`` was found by the search (set by training).
        lr_search_steps: Optimizer steps of each trial run of ``--lr auto``.
        lr_search_trials: Trial runs of ``--lr auto`` (the search costs
            ``lr_search_trials * lr_search_steps`` steps).
        lr_decay_epochs: E such that the learning rate falls tenfold every E epochs
            (lr * gamma^epoch with gamma^E = 0.1); None: ``epochs - 1`` (at least 1), so the
            last epoch runs at a tenth of ``lr``. Training records the value it used.
        batch_size: Training batch size.
        momentum: Nesterov momentum.
        weight_decay: L2 weight decay.
        optimizer: ``sgd`` (Nesterov) or ``adam``.
        limit_train: Train on a random subset of this many images.
        augment: Random translation and flips during training.
        translate: Maximum translation in pixels.
        flip: Horizontal flips (None: where the data declares them natural, see
            :attr:`bnprobe.data.ImageData.flip`).
        eval_train_size: Size of the fixed training subset on which the evaluation-mode
            training loss is logged.
        mc_every: Monte-Carlo validation loss every this many epochs (and after the last;
            0: never); only for nets with noise.
        mc_samples: Forward passes of the Monte-Carlo validation loss.
        seed: Seed of the run (initialization, data order, augmentation, noise).
        device: ``auto``, ``cpu`` or ``cuda``.
    """

    dataset: str = DatasetName.DIGITS.value
    data_root: str | None = None
    image_size: int | None = None
    channels: int | None = None
    arch: str = "allcnn"
    width: float = 1.0
    norm: str = Norm.BN.value
    norm_batch: int | None = None
    project: bool | None = None
    data_init: bool = True
    precise_bn: bool = True
    precise_bn_size: int | None = 10000
    sync_bn: bool = False
    noise: str | None = None
    noise_granularity: str = NoiseGranularity.LAYER.value
    noise_scale: float = 1.0
    learn_noise: str = LearnNoise.OFF.value
    noise_init: float | None = None
    noise_optimizer: str = Optimizer.ADAM.value
    noise_lr: float | None = None
    prior_std: float = 10.0
    kl_weight: float = 1.0
    epochs: int = 10
    lr: float | str | None = None
    lr_auto: bool = False
    lr_search_steps: int = LR_SEARCH_STEPS
    lr_search_trials: int = LR_SEARCH_TRIALS
    lr_decay_epochs: float | None = None
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 0.0
    optimizer: str = Optimizer.SGD.value
    limit_train: int | None = None
    augment: bool = True
    translate: int = 2
    flip: bool | None = None
    eval_train_size: int = 2000
    mc_every: int = 5
    mc_samples: int = 10
    seed: int = 0
    device: str = "auto"

    @property
    def lr_is_auto(self) -> bool:
        """Whether the learning rate is still to be searched."""
        return isinstance(self.lr, str) and self.lr.strip().lower() == AUTO

    @property
    def has_noise(self) -> bool:
        """Whether the net gets fixed or learned noise."""
        return self.noise is not None or self.learn_noise != LearnNoise.OFF.value

    def validate(self) -> TrainConfig:
        """Check every option (resolving defaults), raising a BnprobeError that names the bad one."""
        self.dataset = DatasetName.parse(self.dataset, "dataset").value
        self.norm = Norm.parse(self.norm, "norm").value
        self.optimizer = Optimizer.parse(self.optimizer, "optimizer").value
        self.noise_optimizer = Optimizer.parse(self.noise_optimizer, "noise-optimizer").value
        self.learn_noise = LearnNoise.parse(self.learn_noise, "learn-noise").value
        self.noise_granularity = NoiseGranularity.parse(self.noise_granularity, "noise granularity").value
        self._validate_lr()
        if self.project is None:
            self.project = self.norm != Norm.NONE.value
        min_batch = 2 if self.norm == Norm.BN.value else 1
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= min_batch,
             f"--batch-size must be at least {min_batch} for --norm {self.norm}, got {self.batch_size}"),
            (self.lr_decay_epochs is None or (_finite(self.lr_decay_epochs) and self.lr_decay_epochs > 0),
             f"--lr-decay-epochs must be positive, got {self.lr_decay_epochs}"),
            (self.width > 0, f"--width must be positive, got {self.width}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.translate >= 0, f"--translate must be >= 0, got {self.translate}"),
            (self.eval_train_size >= 1, f"--eval-train-size must be positive, got {self.eval_train_size}"),
            (_finite(self.noise_scale) and self.noise_scale >= 0,
             f"--noise-scale must be finite and >= 0, got {self.noise_scale}"),
            (self.noise_init is None or (_finite(self.noise_init) and self.noise_init > 0),
             f"--noise-init must be positive, got {self.noise_init}"),
            (self.noise_lr is None or (_finite(self.noise_lr) and self.noise_lr > 0),
             f"--noise-lr must be positive, got {self.noise_lr}"),
            (_finite(self.prior_std) and self.prior_std > 0,
             f"--prior-std must be positive, got {self.prior_std}"),
            (_finite(self.kl_weight) and self.kl_weight >= 0,
             f"--kl-weight must be >= 0, got {self.kl_weight}"),
            (self.mc_every >= 0, f"--mc-every must be >= 0, got {self.mc_every}"),
            (self.mc_samples >= 1, f"--mc-samples must be at least 1, got {self.mc_samples}"),
            (isinstance(self.lr_search_steps, int) and self.lr_search_steps >= 1,
             f"--lr-search-steps must be a positive integer, got {self.lr_search_steps}"),
            (self.lr_search_trials >= 3,
             f"--lr-search-trials must be at least 3, got {self.lr_search_trials}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BnprobeError(message)
        self._validate_combinations()
        return self

    def _validate_lr(self) -> None:
        if self.lr is None:
            return
        if self.lr_is_auto:
            self.lr = AUTO
            return
        try:
            self.lr = float(self.lr)
        except (TypeError, ValueError):
            raise BnprobeError(f"--lr must be a positive number or 'auto', got {self.lr!r}") from None
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise BnprobeError(f"--lr must be positive, got {self.lr}")

    def _validate_combinations(self) -> None:
        norm = Norm(self.norm)
        if norm is Norm.NONE and self.learn_noise != LearnNoise.OFF.value:
            raise BnprobeError("--learn-noise needs a normalization: use --norm wn, an or bn, not none")
        if norm is Norm.NONE and self.noise is not None:
            raise BnprobeError("--noise is injected after a normalization: use --norm wn, an or bn, not none")
        learned = self.learn_noise != LearnNoise.OFF.value
        for name, given in (("--noise-init", self.noise_init is not None),
                            ("--noise-lr", self.noise_lr is not None)):
            if given and not learned:
                raise BnprobeError(f"{name} is a setting of learned noise: add --learn-noise layer|channel")
        if self.noise_scale != 1.0 and self.noise is None:
            raise BnprobeError("--noise-scale scales the sigmas of a noise file: add --noise FITTED_JSON "
                               "(or set learned noise's start with --noise-init)")
        if self.noise_scale != 1.0 and self.noise_init is not None:
            raise BnprobeError("--noise-init replaces the noise file's sigmas, so --noise-scale would have "
                               "no effect: give one of them")
        if self.sync_bn and norm is not Norm.BN:
            raise BnprobeError(f"--sync-bn needs --norm bn, got --norm {self.norm}")
        if self.norm_batch is not None:
            if norm is not Norm.BN:
                raise BnprobeError(f"--norm-batch needs --norm bn, got --norm {self.norm}")
            if self.norm_batch < self.batch_size:
                raise BnprobeError(f"--norm-batch ({self.norm_batch}) must be at least --batch-size "
                                   f"({self.batch_size})")

    @property
    def default_lr(self) -> float:
        """The initial learning rate for this norm and optimizer when ``lr`` is not given."""
        norm, optimizer = Norm.parse(self.norm), Optimizer.parse(self.optimizer)
        if norm is Norm.AN and optimizer is Optimizer.SGD and self.arch != "allcnn":
            return DEFAULT_LR_CONVERTED_AN
        return DEFAULT_LR[optimizer][norm]

    @property
    def decay_epochs(self) -> float:
        """Epochs over which the learning rate falls tenfold (``lr_decay_epochs`` or its default)."""
        if self.lr_decay_epochs is not None:
            return float(self.lr_decay_epochs)
        return float(max(1, self.epochs - 1))

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


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def lr_factor(config: TrainConfig, epoch: float) -> float:
    """Factor of the schedule at an epoch: gamma^epoch with gamma^decay_epochs = 0.1."""
    return 0.1 ** (epoch / config.decay_epochs)


def lr_at(config: TrainConfig, epoch: float) -> float:
    """Learning rate of an epoch: lr * gamma^epoch with gamma^decay_epochs = 0.1."""
    if config.lr_is_auto or config.lr is None:
        raise ValueError(f"the learning rate is {config.lr!r}: resolve it before training")
    return float(config.lr) * lr_factor(config, epoch)
