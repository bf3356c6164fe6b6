"""Image folders ``<root>/{train,test}/<class>/*``, decoded once and cached as uint8 tensors."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import BnprobeError
from ..io import atomic_write, read_json
from ._image_data import ImageData

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
CACHE_VERSION = 2  # 2: grayscale folders keep 1 channel
#: Optional file in an image folder declaring its kind: {"flip": false} for data whose mirror
#: images are other classes or not natural (digits, text); default: flips for RGB folders only.
DECLARATION = "bnprobe.json"


def _list_split(root: Path, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    """List (path, label) pairs of one split, classes in sorted order."""
    folder = root / split
    if not folder.is_dir():
        raise BnprobeError(f"image folder split missing: {folder} (expected {root}/{split}/<class>/*)")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise BnprobeError(f"no class folders in {folder}")
    items = []
    for label, name in enumerate(classes):
        for f in sorted((folder / name).iterdir()):
            if f.suffix.lower() in EXTENSIONS:
                items.append((f, label))
    if not items:
        raise BnprobeError(f"no images in {folder}")
    return classes, items


GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _decode(path: Path, size: int | None) -> np.ndarray:
    """One image as uint8 ``(H, W, C)``: C = 1 for grayscale files, 3 otherwise."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            gray = im.mode in GRAY_MODES
            im = im.convert("L" if gray else "RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
            return arr[:, :, None] if gray else arr
    except OSError as exc:
        raise BnprobeError(f"cannot decode image {path}: {exc}") from exc


def _decode_all(items: list[tuple[Path, int]], size: int | None) -> torch.Tensor:
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        arrays = list(pool.map(lambda it: _decode(it[0], size), items, chunksize=256))
    if any(a.shape[2] == 3 for a in arrays):  # a mixed folder becomes RGB
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise BnprobeError(
            f"images differ in size ({', '.join(map(str, sorted(shapes)[:3]))}); "
            "pass --image-size to resize them to one size"
        )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _cache_key(root: Path, listing: list[tuple[Path, int]], size: int | None) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{root.resolve()}|{size}".encode())
    for path, label in listing:
        st = path.stat()
        h.update(f"{path.relative_to(root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _cache_file(root: Path, key: str, cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir) / f"imagefolder-{key}.pt"
    local = root / ".bnprobe-cache"
    if os.access(root, os.W_OK) or local.is_dir():
        return local / f"imagefolder-{key}.pt"
    return Path.home() / ".cache" / "bnprobe" / f"imagefolder-{key}.pt"


def _declared_flip(root: Path, channels: int) -> bool:
    """Whether flips suit this folder: its bnprobe.json says so, else RGB yes, grayscale no."""
    path = root / DECLARATION
    if not path.is_file():
        return channels == 3
    doc = read_json(path, "image folder declaration")
    flip = doc.get("flip") if isinstance(doc, dict) else None
    if not isinstance(flip, bool):
        raise BnprobeError(f'{path}: expected {{"flip": true|false}}, got {doc!r}')
    return flip


def load_imagefolder(
    root: str | Path, image_size: int | None = None, cache_dir: str | Path | None = None
) -> ImageData:
    """Read ``<root>/train/<class>/*`` and ``<root>/test/<class>/*`` as uint8 tensors.

    Grayscale folders keep one channel (a folder mixing grayscale and colour becomes RGB).
    Horizontal flips count as valid augmentation for RGB folders; ``<root>/bnprobe.json`` with
    ``{"flip": false}`` (or true) declares otherwise.

    The decoded tensors are cached (next to the data, or in ``cache_dir``, or in
    ``~/.cache/bnprobe`` when the data folder is read-only) and reused while the file list,
    sizes and modification times are unchanged.

    Args:
        root: The dataset folder.
        image_size: Resize every image to this square size (required if sizes differ).
        cache_dir: Where to keep the decoded cache.

    Returns:
        The dataset.
    """
    root = Path(root)
    if not root.is_dir():
        raise BnprobeError(f"image folder not found: {root}")
    classes, train_items = _list_split(root, "train")
    test_classes, test_items = _list_split(root, "test")
    if test_classes != classes:
        raise BnprobeError(f"{root}: train and test have different class folders")
    key = _cache_key(root, train_items + test_items, image_size)
    cache = _cache_file(root, key, cache_dir)
    if cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)
            return ImageData("imagefolder", str(root), blob["train_x"], blob["train_y"],
                             blob["test_x"], blob["test_y"], list(blob["classes"]),
                             flip=_declared_flip(root, blob["train_x"].shape[1]),
                             _fingerprint=blob["fingerprint"])
        except Exception:  # a broken cache is rebuilt
            pass
    train_x = _decode_all(train_items, image_size)
    test_x = _decode_all(test_items, image_size)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise BnprobeError("train and test images differ in size; pass --image-size")
    data = ImageData(
        "imagefolder", str(root), train_x, torch.tensor([lab for _, lab in train_items]),
        test_x, torch.tensor([lab for _, lab in test_items]), classes,
        flip=_declared_flip(root, train_x.shape[1]),
    )
    blob = {"train_x": data.train_x, "train_y": data.train_y, "test_x": data.test_x,
            "test_y": data.test_y, "classes": classes, "fingerprint": data.fingerprint}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda p: torch.save(blob, p))
    except OSError:
        pass  # caching is an optimization only
    return data
