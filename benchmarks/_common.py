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
