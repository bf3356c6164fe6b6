"""Run by torchrun from test_training_ddp.py: precise BN with the inputs split between ranks.

Usage: torchrun --standalone --nproc-per-node 2 ddp_precise_worker.py OUT_DIR
"""

import sys
from pathlib import Path

import torch

from bnprobe.distributed import setup, shutdown
from bnprobe.measure import recalibrate


def model_and_data():
    """A BN All-CNN with stale buffers and 300 digits images (no augmentation)."""
    from bnprobe.data import DataSpec, load_dataset, make_splits
    from bnprobe.models import AllCNN

    data = load_dataset("digits")
    spec = DataSpec.from_data(data, translate=0, flip=False)
    images = make_splits(data, spec, "cpu", 300, torch.Generator().manual_seed(0)).train
    torch.manual_seed(0)
    return AllCNN(num_classes=10, in_channels=1, width=0.25).eval(), images


def main() -> None:
    out = Path(sys.argv[1])
    world, _ = setup("cpu")
    model, images = model_and_data()
    info = recalibrate(model, images, augment=False, shard=True, device="cpu")
    buffers = {n: b for n, b in model.state_dict().items() if "running" in n}
    torch.save({"buffers": buffers, "images": info["images"]}, out / f"precise{world.rank}.pt")
    shutdown()


if __name__ == "__main__":
    main()
