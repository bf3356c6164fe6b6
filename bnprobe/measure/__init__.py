"""Measuring BN stochasticity: hooks on BN inputs, reference statistics, tidy samples."""

from ._layers import find_bn_layers, preserved_state
from .core import measure
from .measurements import Measurements

__all__ = ["Measurements", "find_bn_layers", "measure", "preserved_state"]
