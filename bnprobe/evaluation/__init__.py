"""Evaluation: calibration metrics, selective prediction, robustness (MC prediction: bnprobe.noise)."""

from __future__ import annotations

from .adversarial import fgsm, gaussian_noise, robustness_curve
from .metrics import accuracy, brier, ece, nll, summary_metrics
from .selective import Uncertainty, aurc, coverage_curve, uncertainty

__all__ = [
    "Uncertainty",
    "accuracy",
    "aurc",
    "brier",
    "coverage_curve",
    "ece",
    "fgsm",
    "gaussian_noise",
    "nll",
    "robustness_curve",
    "summary_metrics",
    "uncertainty",
]
