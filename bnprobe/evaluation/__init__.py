"""Evaluation: calibration metrics, selective prediction, MC averaging and robustness."""

from __future__ import annotations

from .adversarial import fgsm, gaussian_noise, robustness_curve
from .mc import EnableMC, mc_average, mc_predict
from .metrics import accuracy, brier, ece, nll, summary_metrics
from .selective import Uncertainty, aurc, coverage_curve, uncertainty

__all__ = [
    "EnableMC",
    "Uncertainty",
    "accuracy",
    "aurc",
    "brier",
    "coverage_curve",
    "ece",
    "fgsm",
    "gaussian_noise",
    "mc_average",
    "mc_predict",
    "nll",
    "robustness_curve",
    "summary_metrics",
    "uncertainty",
]
