"""Figures of BN randomness (paper Fig. 4) and learning curves, saved as PNG (and PDF).

Every function returns the matplotlib Figure; with ``out`` it also writes the file,
overwriting a previous figure at that path.
"""

from __future__ import annotations

from ._style import figure_paths, save_figure
from .chi2 import plot_chi2
from .curves import plot_curves
from .evaluation import plot_coverage, plot_robustness
from .noise import load_noise, plot_noise, plot_noise_trajectory
from .scaling import plot_batch_scaling, plot_spatial_scaling

__all__ = [
    "figure_paths",
    "load_noise",
    "plot_batch_scaling",
    "plot_chi2",
    "plot_coverage",
    "plot_curves",
    "plot_noise",
    "plot_noise_trajectory",
    "plot_robustness",
    "plot_spatial_scaling",
    "save_figure",
]
