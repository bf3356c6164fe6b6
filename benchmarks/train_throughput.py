"""Images/s of bnprobe's training step against a minimal hand-written PyTorch loop.

Same model (All-CNN, BN), batch size, optimizer and data in memory. The hand-written loop is
the floor: it indexes a pre-normalized float tensor, runs forward, backward and an SGD step.
bnprobe's step (``train_epoch`` over ``DeviceImages.iterate``) additionally normalizes uint8
images per batch, keeps running loss/accuracy on the device and shows no progress bar.
Target: ratio (hand / bnprobe images/s) <= 1.05 without augmentation.

Usage: python benchmarks/train_throughput.py [--width 0.25] [--steps 40] [--device auto]
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved_times, random_images, sync
from torch.nn import functional as F

from bnprobe.models import build_model
from bnprobe.options import resolve_device
from bnprobe.training.loop import train_epoch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 gives stable timings on a shared 2-core machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    bs, n = args.batch_size, args.batch_size * args.steps
    g = torch.Generator().manual_seed(0)
    data = random_images(n, device, g)
    x_float = data.batch(torch.arange(n))[0]  # pre-normalized copy for the hand-written loop
    y_dev = data.labels

    def make():
        model = build_model("allcnn", {"width": args.width, "norm": "bn"}, seed=0).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        return model, opt

    hand_model, hand_opt = make()
    bn_model, bn_opt = make()
    order = torch.Generator().manual_seed(1)
    aug = torch.Generator(device=device).manual_seed(2)

    def hand():
        hand_model.train()
        perm = torch.randperm(n, generator=order).to(device)
        for i in range(args.steps):
            idx = perm[i * bs : (i + 1) * bs]
            loss = F.nll_loss(hand_model(x_float[idx]), y_dev[idx])
            hand_opt.zero_grad(set_to_none=True)
            loss.backward()
            hand_opt.step()
        sync(device)

    def bnprobe_step(augmented):
        def run():
            batches = data.iterate(bs, shuffle=True, augmented=augmented, generator=order,
                                   aug_generator=aug, drop_last=True)
            train_epoch(bn_model, bn_opt, batches)
            sync(device)
        return run

    times = interleaved_times({"hand": hand, "bnprobe": bnprobe_step(False),
                               "bnprobe+augment": bnprobe_step(True)}, repeats=args.repeats)
    ips = {k: n / t for k, t in times.items()}
    print(f"device {device} ({args.threads} threads), All-CNN width {args.width}, batch {bs}, "
          f"{args.steps} steps x {args.repeats}")
    for k, v in ips.items():
        print(f"  {k:16s} {v:8.1f} images/s")
    print(f"ratio hand/bnprobe           = {ips['hand'] / ips['bnprobe']:.3f}  (target <= 1.05)")
    print(f"ratio hand/bnprobe+augment   = {ips['hand'] / ips['bnprobe+augment']:.3f}")


if __name__ == "__main__":
    main()
