"""Run by torchrun from test_training_ddp.py: one DDP + --sync-bn step on this rank's half batch.

Usage: torchrun --standalone --nproc-per-node 2 ddp_syncbn_worker.py OUT_DIR
"""

import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from bnprobe.distributed import setup, shard_slice, shutdown
from bnprobe.models import AllCNN
from bnprobe.norms.syncbn import convert_sync_batchnorm


def reference_model() -> nn.Module:
    """The model and inputs every rank (and the single-process reference) starts from."""
    model = AllCNN(num_classes=3, width=0.1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0  # running buffers = this step's batch statistics (var unbiased)
    return model


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(32, 3, 8, 8, generator=g) * 1.5 + 0.3, torch.randint(0, 3, (32,), generator=g)


def main() -> None:
    out = Path(sys.argv[1])
    world, _ = setup("cpu")
    torch.manual_seed(0)
    model = convert_sync_batchnorm(reference_model())
    net = nn.parallel.DistributedDataParallel(model)
    x, y = inputs()
    part = shard_slice(32, world)
    net.train()
    loss = F.cross_entropy(net(x[part]), y[part])
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if "running" in n}
    torch.save({"grads": grads, "buffers": buffers}, out / f"rank{world.rank}.pt")
    shutdown()


if __name__ == "__main__":
    main()
