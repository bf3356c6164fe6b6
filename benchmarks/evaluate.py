"""MC-30 evaluation time against 30 plain forward passes over the same set (target <= 1.1).

The model is a BN All-CNN, so MC prediction is MCBN: each sample first runs one training
batch to collect statistics. The floor is 30 evaluation-mode passes over the evaluation set
with nothing else.

Usage: python benchmarks/evaluate.py [--width 0.25] [--n 500] [--device auto]
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved_times, random_images, sync

from bnprobe.evaluation.run import _input_batches, _predict, evaluate_model
from bnprobe.models import build_model
from bnprobe.options import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    test, train = random_images(args.n, device, g), random_images(1000, device, g)
    model = build_model("allcnn", {"width": args.width, "norm": "bn"}, seed=0).to(device).eval()

    batches = _input_batches(test, 500, slice(0, len(test)))  # prepared once, outside the timer

    def floor():
        for _ in range(args.samples):
            _predict(model, batches)
        sync(device)

    def mc():
        # evaluate_model also runs the single pass and the metrics; subtract nothing: honest total
        evaluate_model(model, test, train, mc=[args.samples], generator=torch.Generator().manual_seed(1))
        sync(device)

    t = interleaved_times({"floor": floor, "mc": mc}, repeats=args.repeats)
    print(f"device {device}, All-CNN width {args.width}, {args.n} images, MC-{args.samples} (MCBN)")
    print(f"  {args.samples} plain passes {t['floor']:.3f} s")
    print(f"  evaluate MC-{args.samples}    {t['mc']:.3f} s (includes the single pass and all metrics)")
    print(f"ratio evaluate/plain = {t['mc'] / t['floor']:.3f}  (target <= 1.1)")


if __name__ == "__main__":
    main()
