"""Time of ``measure`` against its floor: plain no-grad forward passes over the same inputs.

The floor runs the reference pass (all BN in eval mode, over the same capped data) and one
forward pass per draw on batches of the same sizes, with nothing recorded. Target on CPU for
All-CNN width 0.5, batch sizes 8,32,128: ratio <= 1.25. Also reports the peak Python memory
growth per draw, which must stay at the size of the samples table.

Usage: python benchmarks/measure.py [--width 0.5] [--samples 20] [--device auto]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import torch
from _common import interleaved_times, random_images, sync

from bnprobe.measure import measure
from bnprobe.models import build_model
from bnprobe.options import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--batch-sizes", default="8,32,128")
    parser.add_argument("--cap", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sizes = [int(k) for k in args.batch_sizes.split(",")]
    g = torch.Generator().manual_seed(0)
    n = max(args.cap, max(sizes))
    data = random_images(n, device, g, augment=False)
    model = build_model("allcnn", {"width": args.width, "norm": "bn"}, seed=0).to(device).eval()

    @torch.no_grad()
    def floor():
        model.eval()
        for start in range(0, args.cap, 500):
            model(data.batch(torch.arange(start, min(start + 500, args.cap)))[0])
        model.train()
        gen = torch.Generator().manual_seed(1)
        for k in sizes:
            for _ in range(args.samples):
                model(data.batch(torch.randperm(n, generator=gen)[:k])[0])
        model.eval()
        sync(device)

    def probe():
        measure(model, data, sizes, samples=args.samples, reference_cap=args.cap,
                generator=torch.Generator().manual_seed(1))
        sync(device)

    times = interleaved_times({"floor": floor, "measure": probe}, repeats=args.repeats)
    print(f"device {device}, All-CNN width {args.width}, batch sizes {sizes}, {args.samples} draws each")
    print(f"  floor   {times['floor']:.3f} s")
    print(f"  measure {times['measure']:.3f} s")
    print(f"ratio measure/floor = {times['measure'] / times['floor']:.3f}  (target <= 1.25)")

    peaks = {}
    for draws in (args.samples, 4 * args.samples):
        tracemalloc.start()
        t0 = time.perf_counter()
        m = measure(model, data, sizes, samples=draws, reference_cap=args.cap)
        peaks[draws] = (tracemalloc.get_traced_memory()[1], m.samples.memory_usage(deep=True).sum())
        tracemalloc.stop()
        del m, t0
    (d1, (p1, s1)), (d2, (p2, s2)) = peaks.items()
    print(f"python peak memory: {d1} draws {p1 / 2**20:.1f} MiB (table {s1 / 2**20:.1f} MiB), "
          f"{d2} draws {p2 / 2**20:.1f} MiB (table {s2 / 2**20:.1f} MiB)")
    print(f"growth beyond the table per extra draw: {((p2 - s2) - (p1 - s1)) / (d2 - d1) / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
