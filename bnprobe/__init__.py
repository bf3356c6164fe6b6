"""bnprobe: measure and model the randomness of Batch Normalization.

The public API is imported lazily, so ``import bnprobe`` (and ``bnprobe --help``) stays fast
and does not import torch until a function is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

# public name -> module that defines it
_EXPORTS = {
    "BnprobeError": ".errors",
    "Checkpoint": ".checkpoint",
    "open_checkpoint": ".checkpoint",
    "load_checkpoint": ".checkpoint",
    "save_checkpoint": ".checkpoint",
    "DataSpec": ".data",
    "ImageData": ".data",
    "load_dataset": ".data",
    "make_splits": ".data",
    "AllCNN": ".models",
    "build_model": ".models",
    "TrainConfig": ".training",
    "TrainResult": ".training",
    "train": ".training",
    "Measurements": ".measure",
    "measure": ".measure",
    "fit_noise": ".measure",
    "find_bn_layers": ".measure",
    "measure_checkpoint": ".measure.pipeline",
    "recalibrate": ".measure",
    "recalibrate_checkpoint": ".measure.pipeline",
    "reference_pass": ".measure",
    "retrain": ".retrain",
    "retrain_config": ".retrain",
    "NoiseSpec": ".noise",
    "FixedNoise": ".noise",
    "LearnedNoise": ".noise",
    "InjectedNoise": ".noise",
    "MCBN": ".noise",
    "ParametricBN": ".noise",
    "mc_log_probs": ".noise",
    "evaluate_checkpoint": ".evaluation.run",
    "evaluate_model": ".evaluation.run",
    "run_quickstart": ".quickstart",
    "LearnNoise": ".options",
    "NoiseGranularity": ".options",
    "Norm": ".options",
    "Device": ".options",
    "DatasetName": ".options",
    "resolve_device": ".options",
    "MeasureMode": ".options",
    "Reference": ".options",
    "IsolatedMethod": ".options",
    "SpatialSampling": ".options",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bnprobe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
