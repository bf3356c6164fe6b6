"""Training with the default options: a per-norm learning rate that does not diverge."""

from __future__ import annotations

import json
import math

import pytest

from bnprobe.data import load_dataset
from bnprobe.options import DEFAULT_LR, Norm, Optimizer
from bnprobe.training import TrainConfig, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.parametrize("norm,learn", [("wn", "off"), ("an", "off"), ("an", "channel")])
def test_wn_and_an_train_stably_with_the_defaults(norm, learn, digits, tmp_path):
    """About 300 steps (19 epochs of 16 steps) at the default lr: finite and falling loss."""
    config = TrainConfig(dataset="digits", norm=norm, width=0.25, epochs=19, limit_train=512, device="cpu",
                         eval_train_size=128, mc_every=0, learn_noise=learn)
    assert config.lr is None
    result = train(config, tmp_path / "run", data=digits)
    assert result.config.lr == DEFAULT_LR[Optimizer.SGD][Norm(norm)]
    losses = [row["train_loss"] for row in result.history]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    assert result.history[-1]["val_acc"] > 0.7
    record = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert record["lr"] == result.config.lr and record["lr_decay_epochs"] == 18.0


def test_resume_without_lr_keeps_the_runs_lr(tiny_data, tmp_path):
    base = dict(dataset="synthetic", width=0.25, norm="wn", batch_size=16, device="cpu", eval_train_size=16,
                limit_train=48)
    train(TrainConfig(epochs=1, lr=0.02, **base), tmp_path / "run", data=tiny_data)
    resumed = train(TrainConfig(epochs=2, **base), tmp_path / "run", resume=True, data=tiny_data)
    assert resumed.config.lr == 0.02 and resumed.history[0]["lr"] == 0.02


@pytest.mark.parametrize("arch,norm,optimizer,expected", [
    ("allcnn", "an", "sgd", 0.005),
    ("torchvision:resnet18", "an", "sgd", 0.001),  # 0.005 diverged on CIFAR-10 (options.py)
    ("torchvision:resnet18", "wn", "sgd", 0.005),
    ("torchvision:resnet18", "bn", "sgd", 0.05),
    ("torchvision:resnet18", "an", "adam", 0.001),
])
def test_default_lr_by_norm_optimizer_and_network(arch, norm, optimizer, expected):
    config = TrainConfig(arch=arch, norm=norm, optimizer=optimizer)
    assert config.default_lr == expected
