"""Shared fixtures: tiny datasets, and the real CIFAR-10 JPEGs when ../shared/data has them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bnprobe.data.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture
def tiny_data():
    """A learnable 3x8x8 four-class dataset with 96 training images."""
    return make_synthetic(n_train=96, n_test=32, channels=3, size=8, num_classes=4, seed=0)


@pytest.fixture(scope="session")
def cifar_jpeg_root(tmp_path_factory) -> Path:
    """The real CIFAR-10 JPEGs unpacked into a temporary folder (skips when absent)."""
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 JPEGs not available ({CIFAR_ARCHIVE} missing)")
    root = tmp_path_factory.mktemp("cifar10")
    subprocess.run(["tar", "xzf", str(CIFAR_ARCHIVE), "-C", str(root)], check=True)
    return root
