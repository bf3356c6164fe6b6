"""The official CIFAR-10 python release (``<root>/cifar-10-batches-py``), read directly."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import BnprobeError
from ._image_data import ImageData

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled batch file of the official release."""
    if not path.is_file():
        raise BnprobeError(f"CIFAR-10 batch file missing: {path} (use --download or check --data-root)")
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry.get(b"labels", entry.get(b"fine_labels")), dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as exc:
        raise BnprobeError(f"{path} is not a CIFAR-10 python batch file: {exc}") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise BnprobeError(f"{path}: unexpected data shape {data.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _read_split(folder: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_read_batch(folder / n) for n in names]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(x), torch.from_numpy(y)


def download_cifar10(root: str | Path) -> None:
    """Download and unpack the official release into ``root`` with torchvision's downloader.

    Needs a network connection.
    """
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=True, download=True)
    except Exception as exc:  # network errors come in many types
        raise BnprobeError(f"could not download CIFAR-10 to {root}: {exc}") from exc


def load_cifar10(root: str | Path, download: bool = False) -> ImageData:
    """Read CIFAR-10 from ``<root>/cifar-10-batches-py`` (50,000 train, 10,000 test images).

    Args:
        root: The folder containing ``cifar-10-batches-py``.
        download: Download the release first when it is missing.

    Returns:
        The dataset.
    """
    root = Path(root)
    folder = root / FOLDER
    if not folder.is_dir():
        if download:
            download_cifar10(root)
        else:
            raise BnprobeError(
                f"CIFAR-10 not found: {folder} does not exist (pass --download, or --data-root)"
            )
    train_x, train_y = _read_split(folder, TRAIN_BATCHES)
    test_x, test_y = _read_split(folder, TEST_BATCHES)
    classes = CLASSES
    meta = folder / "batches.meta"
    if meta.is_file():
        try:
            with open(meta, "rb") as f:
                names = pickle.load(f, encoding="bytes")[b"label_names"]
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        except Exception:  # the class names are cosmetic; fall back to the official list
            classes = CLASSES
    return ImageData("cifar10", str(root), train_x, train_y, test_x, test_y, list(classes))
