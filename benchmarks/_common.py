"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def sync(device) -> None:
    """Wait for queued CUDA work so that timings are complete (no-op on CPU)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def interleaved_times(fns: dict[str, Callable[[], None]], repeats: int = 5, warmup: int = 1) -> dict:
    """Time each function ``repeats`` times, interleaving them to share machine noise.

    Returns:
        name -> median seconds.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def random_images(n: int, device, generator, augment: bool = True):
    """``n`` random uint8 32x32 RGB images with random labels of 10 classes, as DeviceImages.

    Normalized with CIFAR-like statistics; ``augment`` sets the ±2 px translation and flips.
    """
    import torch

    from bnprobe.data import DeviceImages, Normalization

    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    norm = Normalization([0.49, 0.48, 0.45], [0.25, 0.24, 0.26], translate=2 if augment else 0,
                         flip=augment)
    return DeviceImages(images, labels, norm, device)
