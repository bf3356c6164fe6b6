"""Time of ``measure`` against its floors: plain no-grad forward passes over the same inputs.

Three ratios (CPU targets for All-CNN width 0.5, batch sizes 8,32,128):
- reference: the sequential population reference pass over N inputs, in plain eval-mode
  forward passes over the same N inputs (target <= 2);
- joint: ``measure`` against one eval pass over the reference inputs plus one training-mode
  forward pass per draw, nothing recorded (target <= 1.10);
- isolated: the same forward-pass floor against isolated mode with sufficient statistics
  (reference pass plus index sampling), 200 draws per batch size (target >= 10x faster).
Also reports the peak Python memory growth per draw, which must stay at the samples table.

Usage: python benchmarks/measure.py [--width 0.5] [--samples 20] [--device auto]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import torch
from _common import interleaved_times, random_images, sync

from bnprobe.measure import measure
from bnprobe.measure._source import InputSource
from bnprobe.measure.reference import reference_pass
from bnprobe.models import build_model
from bnprobe.options import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--batch-sizes", default="8,32,128")
    parser.add_argument("--reference-size", type=int, default=1000, help="inputs of the reference")
    parser.add_argument("--isolated-samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sizes = [int(k) for k in args.batch_sizes.split(",")]
    g = torch.Generator().manual_seed(0)
    n = max(args.reference_size, max(sizes))  # the reference uses all n inputs
    data = random_images(n, device, g, augment=False)
    model = build_model("allcnn", {"width": args.width, "norm": "bn"}, seed=0).to(device).eval()

    @torch.no_grad()
    def eval_pass():
        model.eval()
        for start in range(0, args.reference_size, 500):
            model(data.batch(torch.arange(start, min(start + 500, args.reference_size)))[0])
        sync(device)

    @torch.no_grad()
    def draws_floor(samples):
        model.train()
        gen = torch.Generator().manual_seed(1)
        for k in sizes:
            for _ in range(samples):
                model(data.batch(torch.randperm(n, generator=gen)[:k])[0])
        model.eval()
        sync(device)

    def reference():
        reference_pass(model, InputSource(data, device), generator=torch.Generator().manual_seed(1))
        sync(device)

    def floor():
        eval_pass()
        draws_floor(args.samples)

    def joint():
        measure(model, data, sizes, samples=args.samples, reference_size=args.reference_size,
                generator=torch.Generator().manual_seed(1))
        sync(device)

    def floor_isolated():
        eval_pass()
        draws_floor(args.isolated_samples)

    def isolated():
        measure(model, data, sizes, samples=args.isolated_samples, mode="isolated",
                reference_size=args.reference_size, generator=torch.Generator().manual_seed(1))
        sync(device)

    times = interleaved_times({"eval_pass": eval_pass, "reference": reference, "floor": floor,
                               "joint": joint}, repeats=args.repeats)
    slow = interleaved_times({"floor_isolated": floor_isolated, "isolated": isolated}, repeats=1)
    print(f"device {device}, All-CNN width {args.width}, batch sizes {sizes}, "
          f"reference over {args.reference_size} inputs")
    for name, t in {**times, **slow}.items():
        print(f"  {name:15s} {t:.3f} s")
    print(f"reference pass = {times['reference'] / times['eval_pass']:.2f} forward passes  (target <= 2)")
    print(f"ratio joint measure/floor = {times['joint'] / times['floor']:.3f}  (target <= 1.10), "
          f"{args.samples} draws per batch size")
    print(f"isolated (sufficient statistics): {slow['floor_isolated'] / slow['isolated']:.1f}x faster than "
          f"the forward-pass floor, {args.isolated_samples} draws per batch size  (target >= 10)")

    peaks = {}
    for draws in (args.samples, 4 * args.samples):
        tracemalloc.start()
        t0 = time.perf_counter()
        m = measure(model, data, sizes, samples=draws, reference_size=args.reference_size)
        peaks[draws] = (tracemalloc.get_traced_memory()[1], m.samples.memory_usage(deep=True).sum())
        tracemalloc.stop()
        del m, t0
    (d1, (p1, s1)), (d2, (p2, s2)) = peaks.items()
    print(f"python peak memory: {d1} draws {p1 / 2**20:.1f} MiB (table {s1 / 2**20:.1f} MiB), "
          f"{d2} draws {p2 / 2**20:.1f} MiB (table {s2 / 2**20:.1f} MiB)")
    print(f"growth beyond the table per extra draw: {((p2 - s2) - (p1 - s1)) / (d2 - d1) / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
