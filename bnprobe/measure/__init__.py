"""Measuring BN stochasticity: hooks on BN inputs, reference statistics, fitted noise."""

from ..layers import find_bn_layers, preserved_state
from .core import measure
from .fit import fit_device_noise, fit_noise, noise_flags
from .measurements import Measurements
from .recalibrate import recalibrate
from .reference import ReferenceResult, reference_pass

__all__ = ["Measurements", "ReferenceResult", "find_bn_layers", "fit_device_noise", "fit_noise",
           "measure", "noise_flags", "preserved_state", "recalibrate", "reference_pass"]
