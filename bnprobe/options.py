"""Option values as ``str`` Enums, validated early with a message that names the bad value."""

from __future__ import annotations

import enum
from typing import TypeVar

from .errors import BnprobeError

E = TypeVar("E", bound="Choice")


class Choice(str, enum.Enum):
    """Base class of bnprobe's option enums: ``Norm.parse("bn")`` or ``Norm("bn")``."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls: type[E], value: str | E, what: str | None = None) -> E:
        """Convert ``value`` to this enum, raising a BnprobeError naming it when invalid.

        Args:
            value: A member or its string value (case-insensitive).
            what: The option's name for the message (defaults to the class name).

        Returns:
            The enum member.
        """
        if isinstance(value, cls):
            return value
        text = str(value).strip().lower()
        for member in cls:
            if member.value == text:
                return member
        allowed = ", ".join(m.value for m in cls)
        raise BnprobeError(f"invalid {what or cls.__name__.lower()} {value!r}; choose from {allowed}")


class Device(Choice):
    """Where computation runs; ``auto`` picks CUDA when available."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Norm(Choice):
    """Normalization after each convolution."""

    NONE = "none"
    BN = "bn"
    WN = "wn"
    AN = "an"


class NoiseGranularity(Choice):
    """Fixed noise levels: one per layer or one per channel (from fitted.json)."""

    LAYER = "layer"
    CHANNEL = "channel"


class LearnNoise(Choice):
    """Learned noise (variational Bayes): off, one sigma_S per layer or per channel."""

    OFF = "off"
    LAYER = "layer"
    CHANNEL = "channel"


class DatasetName(Choice):
    """Datasets bnprobe reads."""

    DIGITS = "digits"
    CIFAR10 = "cifar10"
    IMAGEFOLDER = "imagefolder"
    SYNTHETIC = "synthetic"


class Augment(Choice):
    """Training augmentation.

    ``auto`` follows the data's declared kind: translations, plus flips where mirrored images
    are natural (CIFAR-10 and RGB image folders, not digits).
    """

    AUTO = "auto"
    NONE = "none"
    TRANSLATE = "translate"
    FLIP = "flip"
    BOTH = "translate+flip"

    def settings(self) -> dict:
        """TrainConfig fields: ``augment``, ``flip`` (None: the data's default), ``translate``."""
        return {Augment.AUTO: {"augment": True, "flip": None},
                Augment.NONE: {"augment": False, "flip": None},
                Augment.TRANSLATE: {"augment": True, "flip": False},
                Augment.FLIP: {"augment": True, "flip": True, "translate": 0},
                Augment.BOTH: {"augment": True, "flip": True}}[self]


class Split(Choice):
    """Data splits."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"


class MeasureMode(Choice):
    """How BN layers behave while measuring: all in training mode, or only the measured one."""

    JOINT = "joint"
    ISOLATED = "isolated"


class Reference(Choice):
    """Reference statistics mu, sigma^2 that V and U are measured against."""

    POPULATION = "population"
    RUNNING = "running"


class IsolatedMethod(Choice):
    """How isolated mode draws batches: from per-input sufficient statistics or by forward passes."""

    SUFFICIENT = "sufficient"
    FORWARD = "forward"


class SpatialSampling(Choice):
    """Random spatial subsets: positions drawn per input (i.i.d.) or one set shared by the batch."""

    INDEPENDENT = "independent"
    SHARED = "shared"


class Optimizer(Choice):
    """Optimizers for training."""

    SGD = "sgd"
    ADAM = "adam"


#: Default initial learning rate per optimizer and normalization. With SGD (Nesterov momentum
#: 0.9, batch 32) wn and an diverge at rates that bn takes: their normalization does not undo
#: a step's change of a layer's gain and mean as BN's batch statistics do, so the change
#: compounds over the layers (see the README's "Learning rates"). Their default sits a factor
#: 2-4 below the smallest rate that diverged in 300-step runs on digits and CIFAR-10.
DEFAULT_LR = {
    Optimizer.SGD: {Norm.BN: 0.05, Norm.WN: 0.005, Norm.AN: 0.005, Norm.NONE: 0.01},
    Optimizer.ADAM: {Norm.BN: 0.001, Norm.WN: 0.001, Norm.AN: 0.001, Norm.NONE: 0.001},
}


#: SGD's default rate for AN on a converted ``torchvision:<name>`` network: at 0.005 an AN
#: resnet18 on CIFAR-10 diverged within its first epoch (loss NaN; with learned noise, 12,000),
#: at 0.001 it trained (52% validation accuracy after one epoch, BN 48%). Its predicted moments
#: drift from the actual ones as the weights fit the data, and over 20 layers with residual sums
#: the error compounds; WN at 0.005 trained.
DEFAULT_LR_CONVERTED_AN = 0.001


def default_lr_help() -> str:
    """The default learning rates in words, for ``--help``."""
    sgd = DEFAULT_LR[Optimizer.SGD]
    by_rate: dict[float, list[str]] = {}
    for norm, rate in sgd.items():
        by_rate.setdefault(rate, []).append(norm.value)
    parts = ", ".join(f"{rate:g} for {'/'.join(names)}" for rate, names in by_rate.items())
    adam = sorted(set(DEFAULT_LR[Optimizer.ADAM].values()))
    return (f"sgd: {parts} ({DEFAULT_LR_CONVERTED_AN:g} for an on torchvision:<name>); "
            f"adam: {'/'.join(f'{r:g}' for r in adam)}")


#: Default initial learning rate of the learned-noise parameters (u, s) with Adam. Their
#: gradient is weak and noisy (the KL part of u's is 1/|D| per step): with the tenfold decay of
#: the schedule, 0.03 moves sigma_S from 0.01 or 0.3 to the same per-layer profile within
#: ~30 digits epochs, and to the exact posterior of a conjugate model (see the tests).
NOISE_ADAM_LR = 0.03

#: Default length (optimizer steps) and number of the trial runs of ``--lr auto``.
LR_SEARCH_STEPS = 100
LR_SEARCH_TRIALS = 6


def resolve_device(device: str | Device | None = None):
    """Resolve ``auto``/``cpu``/``cuda`` (or a torch device string like ``cuda:1``) to a torch.device.

    Args:
        device: The requested device; None means auto.

    Returns:
        A ``torch.device``.

    Raises:
        BnprobeError: When CUDA is requested but not available, or the value is unknown.
    """
    import torch

    if device is None:
        device = Device.AUTO
    if isinstance(device, torch.device):
        return device
    text = str(device).strip().lower()
    if text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise BnprobeError(f"device {device!r} requested but CUDA is not available")
        return torch.device(text)
    choice = Device.parse(text, "device")
    if choice is Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice is Device.CUDA and not torch.cuda.is_available():
        raise BnprobeError("device 'cuda' requested but CUDA is not available")
    return torch.device(choice.value)
