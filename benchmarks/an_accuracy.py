"""Per-layer accuracy of analytic normalization on a torchvision network at init.

Every BatchNorm of the network (random weights, no training) is replaced by a normalization
with the moments that ``propagate_graph`` predicts for its input; at each of them the
predicted per-channel mean and variance are compared with those measured over the images in
that same network (``bnprobe.norms.an_check``). Columns, per mode: the median (max) over
channels of |mean error| in measured standard deviations, the median [10%, 90%] of the
variance ratio measured / predicted, and the pooled ratio (mean measured over mean predicted
variance). Modes: chain (the AN network as is; errors compound), anchored (each block
predicted from the measured outputs of the previous normalizations), decorrelated (the
rules' independence assumption made true; chain predictions), decorrelated-positions and
decorrelated-channels (only one of the two correlations removed: which one the rules miss).
Predictions use the images' lag covariance at the first conv and the stem pool, as an
ANNetwork does; a mode with ``-independent`` (``chain-independent``, ``anchored-independent``)
takes the images as independent too (``an_layer_errors(spatial=False)``).
A last line per mode gives the range of the pooled ratio and the layers within 10% of it.

Usage: python benchmarks/an_accuracy.py --arch resnet18 --images 2000 [--data /tmp/cifar10]
(without the CIFAR-10 JPEG folder: smooth synthetic images with CIFAR-like statistics)
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from bnprobe.norms.an_check import an_layer_errors

MEAN, STD = (0.4913, 0.4821, 0.4465), (0.2452, 0.2428, 0.2606)


def cifar_images(root: Path, n: int) -> torch.Tensor:
    """The first ``n / 10`` test images of every class, normalized."""
    from PIL import Image

    classes = sorted(p.name for p in (root / "test").iterdir())
    per = math.ceil(n / len(classes))
    images = [np.asarray(Image.open(f).convert("RGB"))
              for c in classes for f in sorted((root / "test" / c).iterdir())[:per]]  # fmt: skip
    x = torch.from_numpy(np.stack(images[:n])).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def synthetic_images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth (Gaussian blur, sigma 1.5 px), channel-correlated images, standardized."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, 40, 40, generator=g)
    t = torch.arange(-4, 5, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / 1.5) ** 2)
    x = F.conv2d(z, (k[:, None] * k[None, :] / k.sum() ** 2).expand(3, 1, 9, 9), groups=3)
    corr = torch.tensor([[1.0, 0.9, 0.8], [0.9, 1.0, 0.9], [0.8, 0.9, 1.0]])
    x = torch.einsum("dc,nchw->ndhw", torch.linalg.cholesky(corr), x)
    return (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)


def _what(mode: str) -> str:
    for what in ("positions", "channels"):
        if f"decorrelated-{what}" in mode:
            return what
    return "all" if "decorrelated" in mode else "none"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="resnet18", help="torchvision model name")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--data", default="/tmp/cifar10", help="CIFAR-10 JPEG folder (test/<class>/)")
    parser.add_argument("--modes", default="chain,anchored,decorrelated")
    parser.add_argument("--seed", type=int, default=0, help="weight initialization seed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.data)
    if (root / "test").is_dir():
        x, source = cifar_images(root, args.images), f"CIFAR-10 test images from {root}"
    else:
        x, source = synthetic_images(args.images), "synthetic images (no CIFAR-10 folder)"
    torch.manual_seed(args.seed)
    model = getattr(torchvision.models, args.arch)(num_classes=10).eval()
    modes = args.modes.split(",")
    results = {}
    for mode in modes:
        t0 = time.perf_counter()
        results[mode] = an_layer_errors(model, x, anchored="anchored" in mode, decorrelated=_what(mode),
                                        spatial="independent" not in mode)  # fmt: skip
        print(f"# {mode}: {time.perf_counter() - t0:.1f} s")
    print(f"# {args.arch} at init (seed {args.seed}), {x.shape[0]} {source}")
    head = " | ".join(f"{m} \\|dm\\|/sd | {m} var ratio | {m} pooled" for m in modes)
    print(f"| layer | C | HxW | {head} |")
    print("|---|---:|---|" + "---|---|---:|" * len(modes))
    for i, first in enumerate(results[modes[0]]):
        cells = []
        for m in modes:
            s = results[m][i].summary()
            spread = f"[{s['var_ratio_q10']:.2f}, {s['var_ratio_q90']:.2f}]"
            cells.append(f"{s['mean_err_med']:.2f} ({s['mean_err_max']:.2f}) | {s['var_ratio_med']:.2f} "
                         f"{spread} | {s['var_ratio_pooled']:.2f}")
        s = first.summary()
        print(f"| {s['layer']} | {s['C']} | {s['HxW']} | " + " | ".join(cells) + " |")
    for m in modes:
        pooled = [e.pooled_var_ratio for e in results[m]]
        within = sum(abs(p - 1) < 0.1 for p in pooled)
        span = f"{min(pooled):.2f}-{max(pooled):.2f}"
        print(f"# {m}: pooled ratio {span}, {within} of {len(pooled)} layers within 10%")


if __name__ == "__main__":
    main()
