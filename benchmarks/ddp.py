"""Training images/s of 1 process against N DDP processes (torchrun, gloo on CPU, nccl on CUDA).

On CPU the cores are split: one process with T threads against T processes with one thread
each, at the same global batch (the per-process batch is the global batch / N), so the ratio
shows what DDP's communication costs, not extra hardware. On CUDA, one process on one device
against one process per device (the global batch grows with the devices).

Usage: python benchmarks/ddp.py [--width 0.25] [--batch 64] [--steps 20] [--procs 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def worker(args: argparse.Namespace) -> None:
    """One process of a run: time ``--steps`` DDP training steps; rank 0 prints images/s."""
    import torch
    from torch.nn import functional as F

    from bnprobe.distributed import setup, shutdown
    from bnprobe.models import build_model

    world, device = setup(args.device)
    model = build_model("allcnn", {"width": args.width, "norm": "bn"}, seed=0).to(device)
    net = model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator(device=device).manual_seed(world.rank)
    x = torch.randn(args.batch, 3, 32, 32, generator=g, device=device)
    y = torch.randint(0, 10, (args.batch,), generator=g, device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.nll_loss(net(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if world.is_main:
        print(f"RESULT {args.batch * world.size * args.steps / seconds:.1f}")
    shutdown()


def run(procs: int, threads: int, batch: int, args: argparse.Namespace, device: str) -> float:
    """Images/s of a run with ``procs`` processes of ``threads`` threads each."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
           __file__, "--worker", "--width", str(args.width), "--batch", str(batch), "--steps",
           str(args.steps), "--device", device]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return float(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("RESULT")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=64, help="global batch on CPU; per device on CUDA")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    procs = args.procs
    ones, manys = [], []
    for _ in range(args.repeats):  # alternate, so both see the same machine load
        ones.append(run(1, procs, args.batch, args, "cpu"))
        manys.append(run(procs, 1, args.batch // procs, args, "cpu"))
    one, many = statistics.median(ones), statistics.median(manys)
    print(f"CPU (gloo), All-CNN width {args.width}, global batch {args.batch}, {args.steps} steps")
    print(f"  1 process x {procs} threads   {one:8.1f} img/s")
    print(f"  {procs} processes x 1 thread  {many:8.1f} img/s")
    print(f"ratio {procs} processes / 1 = {many / one:.3f}")
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        one = run(1, 1, args.batch, args, "cuda")
        many = run(n, 1, args.batch, args, "cuda") if n > 1 else one
        print(f"CUDA (nccl), batch {args.batch} per device")
        print(f"  1 device   {one:8.1f} img/s")
        print(f"  {n} devices {many:8.1f} img/s  ratio {many / one:.3f}")


if __name__ == "__main__":
    main()
