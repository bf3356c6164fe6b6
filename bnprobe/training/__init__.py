"""Training: options, the resumable loop, evaluation-mode losses."""

from .config import TrainConfig, lr_at
from .evaluate import loss_and_accuracy, mc_loss_and_accuracy
from .loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "loss_and_accuracy", "lr_at", "mc_loss_and_accuracy", "train"]
