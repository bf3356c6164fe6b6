"""Training-step time of each normalization/noise configuration as a ratio to BN.

Same network (All-CNN of width 0.25 by default, or a torchvision model such as
``--arch torchvision:resnet18``, converted from its BN version by its graph), batch size 32,
32x32 inputs, SGD with Nesterov momentum and bnprobe's real training step (``train_epoch``
with the projection after every step and, for learned noise, the KL term). Configurations: bn
(the reference), wn, wn + fixed noise (per-channel sigmas), an, an + learned noise (per
channel). Timings are interleaved so that all configurations share the machine's noise.

Targets on CPU: wn <= 1.15, wn+fixed <= 1.2, an <= 1.3, an+learned <= 1.4. WN and AN layers
crop kernel taps that read only zero padding (a 3x3 kernel on a 1x1 map), which torchvision's BN
convolutions do not: on ImageNet-style nets at 32x32 that saving enters the ratios to BN, so the
script also prints AN against WN (the same convolutions), the cost of the moments alone.

Usage: python benchmarks/train_step.py [--arch allcnn] [--width 0.25] [--steps 10] [--repeats 7]
       [--threads 1] [--no-input-covariance]
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved_times, random_images, sync

from bnprobe.models import build_model
from bnprobe.models.registry import noise_layers
from bnprobe.noise.network import set_noise_generator
from bnprobe.norms.an import InputMoments, dataset_channel_moments
from bnprobe.norms.spatial import lag_covariance
from bnprobe.options import resolve_device
from bnprobe.training import TrainConfig
from bnprobe.training.setup import make_optimizer, step_hooks
from bnprobe.training.steps import train_epoch

TARGETS = {"wn": 1.15, "wn+fixed": 1.2, "an": 1.3, "an+learned": 1.4}


def _noise(arch: str, width: float) -> dict:
    names, channels = noise_layers(arch, {"num_classes": 10, "width": width})
    noise = {"sigma_v": [[0.1 + 0.001 * j for j in range(c)] for c in channels],
             "sigma_u": [[0.05 + 0.001 * j for j in range(c)] for c in channels], "scale": 1.0}
    return noise if names is None else {**noise, "names": names}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="allcnn", help="allcnn or torchvision:<name>")
    parser.add_argument("--width", type=float, default=0.25, help="All-CNN width")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-input-covariance", action="store_true",
                        help="AN without the images' lag covariance (independent input positions)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    bs, n = args.batch_size, args.batch_size * args.steps
    g = torch.Generator().manual_seed(0)
    data = random_images(n, device, g)
    moments = dataset_channel_moments(data.images.cpu(), data.norm.mean, data.norm.std)
    # AN networks keep the images' lag covariance, as training fills it (bnprobe.norms.spatial)
    cov = None if args.no_input_covariance else lag_covariance(data.images.cpu(), std=data.norm.std)
    configs = {
        "bn": ("bn", {}),
        "wn": ("wn", {}),
        "wn+fixed": ("wn", {"noise": _noise(args.arch, args.width)}),
        "an": ("an", {}),
        "an+learned": ("an", {"learn_noise": "channel"}),
    }
    # WN of deep torchvision nets diverges at All-CNN's rate; the rate does not change the step time
    lr = 0.01 if args.arch == "allcnn" else 0.001

    def make(norm_name: str, extra: dict):
        kwargs = {"num_classes": 10, "norm": norm_name, **extra}
        if args.arch == "allcnn":
            kwargs["width"] = args.width
        model = build_model(args.arch, kwargs, seed=0).to(device)
        for store in model.modules():
            if isinstance(store, InputMoments):
                store.set_(*moments, cov)
        set_noise_generator(model, torch.Generator(device=device).manual_seed(1))
        config = TrainConfig(norm=norm_name, lr=lr, learn_noise=extra.get("learn_noise", "off")).validate()
        optimizer = make_optimizer(model, config, lr)
        after, regularizer = step_hooks(model, config, 45000)
        order = torch.Generator().manual_seed(1)

        def run() -> None:
            batches = data.iterate(bs, shuffle=True, generator=order, drop_last=True)
            train_epoch(model, optimizer, batches, after_step=after, regularizer=regularizer)
            sync(device)
        return run

    times = interleaved_times({name: make(*spec) for name, spec in configs.items()}, repeats=args.repeats)
    net = f"All-CNN width {args.width}" if args.arch == "allcnn" else args.arch
    print(f"device {device}, threads {torch.get_num_threads()}, {net}, "
          f"batch {bs}, {args.steps} steps x {args.repeats} repeats (median)")
    base = times["bn"]
    print(f"  {'bn':12s} {1000 * base / args.steps:8.1f} ms/step  ratio 1.000")
    for name, t in times.items():
        if name == "bn":
            continue
        ratio = t / base
        verdict = "ok" if ratio <= TARGETS[name] else "MISSED"
        print(f"  {name:12s} {1000 * t / args.steps:8.1f} ms/step  ratio {ratio:.3f}  "
              f"(target <= {TARGETS[name]}: {verdict})")
    # WN/AN layers skip kernel taps that read only zero padding (deep layers of ImageNet nets
    # on 32x32 images); torchvision's BN convolutions do not. Against WN, which runs the same
    # convolutions, the ratio is the cost of AN's moment propagation alone.
    wn = times["wn"]
    print(f"  an over wn (the same convolutions): an {times['an'] / wn:.3f}, "
          f"an+learned {times['an+learned'] / wn:.3f}")


if __name__ == "__main__":
    main()
