"""Datasets held in memory as uint8 tensors, with device-side normalization and augmentation."""

from ._image_data import ImageData
from .augment import augment
from .batches import DeviceImages, Normalization, num_batches
from .spec import DataSpec, Splits, default_root, load_dataset, load_for_spec, make_splits
from .splits import train_val_split

__all__ = [
    "DataSpec",
    "DeviceImages",
    "ImageData",
    "Normalization",
    "Splits",
    "augment",
    "default_root",
    "load_dataset",
    "load_for_spec",
    "make_splits",
    "num_batches",
    "train_val_split",
]
