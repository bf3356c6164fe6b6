"""Measuring BN stochasticity: hooks on BN inputs, reference statistics, fitted noise."""

from ._layers import find_bn_layers, preserved_state
from .core import measure
from .fit import fit_noise, noise_flags
from .measurements import Measurements
from .noise_spec import NoiseSpec

__all__ = ["Measurements", "NoiseSpec", "find_bn_layers", "fit_noise", "measure", "noise_flags",
           "preserved_state"]
