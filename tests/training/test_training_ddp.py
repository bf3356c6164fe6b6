"""torchrun / DDP training with 2 gloo processes on CPU against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F

from bnprobe import distributed
from bnprobe.checkpoint import open_checkpoint
from bnprobe.cli.main import cli
from bnprobe.training import TrainConfig, train

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
    [str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])}


def _torchrun(*args, cwd=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_sync_bn_two_ranks_equal_one_process_at_the_global_batch(tmp_path):
    sys.path.insert(0, str(HERE))
    try:
        import ddp_syncbn_worker as worker
    finally:
        sys.path.remove(str(HERE))
    _torchrun(str(HERE / "ddp_syncbn_worker.py"), str(tmp_path))
    torch.manual_seed(0)
    model = worker.reference_model()  # plain BatchNorm2d, one process, batch 32
    x, y = worker.inputs()
    model.train()
    F.cross_entropy(model(x), y).backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=0, atol=1e-5)
        for name, b in model.named_buffers():
            if "running" in name:  # the batch statistics BN used (momentum 1)
                torch.testing.assert_close(got["buffers"][name], b, rtol=0, atol=1e-5)


def test_precise_bn_split_between_ranks_equals_one_process(tmp_path):
    sys.path.insert(0, str(HERE))
    try:
        import ddp_precise_worker as worker
    finally:
        sys.path.remove(str(HERE))
    from bnprobe.measure import recalibrate

    _torchrun(str(HERE / "ddp_precise_worker.py"), str(tmp_path))
    model, images = worker.model_and_data()
    recalibrate(model, images, augment=False, device="cpu")  # one process, all 300 images
    for rank in (0, 1):
        got = torch.load(tmp_path / f"precise{rank}.pt", weights_only=True)
        assert got["images"] == 300
        for name, b in model.state_dict().items():
            if "running" in name:
                torch.testing.assert_close(got["buffers"][name], b, rtol=1e-5, atol=1e-6)


def _args(out, epochs, *extra):
    return ["-m", "bnprobe", "train", "--dataset", "digits", "--limit-train", "256", "--width", "0.25",
            "--batch-size", "16", "--epochs", str(epochs), "--out", str(out), "--quiet", *extra]


def test_two_rank_run_resumed_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    _torchrun(*_args(tmp_path / "full", 2, "--learn-noise", "channel", "--norm", "an"))
    _torchrun(*_args(tmp_path / "cut", 1, "--learn-noise", "channel", "--norm", "an"))
    _torchrun(*_args(tmp_path / "cut", 2, "--learn-noise", "channel", "--norm", "an", "--resume"))
    full = open_checkpoint(tmp_path / "full").model.state_dict()
    cut = open_checkpoint(tmp_path / "cut").model.state_dict()
    for k, v in full.items():
        torch.testing.assert_close(cut[k], v, rtol=0, atol=0)
    payload = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    assert payload["world_size"] == 2 and len(payload["rng_ranks"]) == 2
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["checkpoint.pt", "config.json",
                                                                    "metrics.csv"]
    # one process cannot resume a 2-process run: one line, exit 2
    result = CliRunner().invoke(cli, _args(tmp_path / "full", 3, "--learn-noise", "channel", "--norm",
                                           "an", "--resume")[2:])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "trained by 2 process(es)" in lines[0] and "--nproc-per-node 2" in lines[0]


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    """Rank 1 of a 2-process run trains and evaluates but writes nothing (collectives faked)."""
    from bnprobe.training import loop

    fake = distributed.World(rank=1, size=2)
    monkeypatch.setattr(distributed, "setup", lambda device: (fake, torch.device("cpu")))
    monkeypatch.setattr(distributed, "world", lambda: fake)
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda t: t)
    monkeypatch.setattr(distributed, "all_gather_objects", lambda obj: [obj, obj])
    monkeypatch.setattr(distributed, "broadcast_buffers", lambda model, src=0: None)
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj, src=0: obj)
    monkeypatch.setattr(loop, "_ddp", lambda model, device: model)
    lines = []
    config = TrainConfig(dataset="digits", limit_train=256, width=0.25, batch_size=16, epochs=1,
                         device="cpu")
    result = train(config, tmp_path / "run", log=lines.append)
    assert result.history and not lines
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_global_batches_are_split_into_disjoint_shards():
    from bnprobe.training.steps import epoch_order

    one = epoch_order(103, 32, torch.Generator().manual_seed(4))
    ranks = [epoch_order(103, 16, torch.Generator().manual_seed(4), distributed.World(r, 2)) for r in (0, 1)]
    assert one.shape == (3, 32) and ranks[0].shape == ranks[1].shape == (3, 16)
    torch.testing.assert_close(torch.cat(ranks, dim=1), one)  # global batch t = one process's batch t
    assert not set(ranks[0].flatten().tolist()) & set(ranks[1].flatten().tolist())


def test_sync_bn_needs_bn():
    result = CliRunner().invoke(cli, ["train", "--norm", "wn", "--sync-bn", "--epochs", "1"])
    assert result.exit_code == 2 and "--sync-bn needs --norm bn" in result.output


@pytest.mark.parametrize("noise", [False, True])
def test_sync_bn_without_a_process_group_is_plain_bn(noise):
    from bnprobe.models import AllCNN
    from bnprobe.norms.syncbn import SyncBatchNorm2d, convert_sync_batchnorm

    zeros = [[0.0] * c for c in _channels()]
    kw = {"noise": {"sigma_v": zeros, "sigma_u": zeros}} if noise else {}
    a = AllCNN(num_classes=3, width=0.1, **kw)
    b = convert_sync_batchnorm(AllCNN(num_classes=3, width=0.1, **kw))
    b.load_state_dict(a.state_dict())
    assert sum(isinstance(m, SyncBatchNorm2d) for m in b.modules()) == 9
    x = torch.randn(8, 3, 8, 8)
    torch.testing.assert_close(b.train()(x), a.train()(x))
    torch.testing.assert_close(b.eval()(x), a.eval()(x))
    assert json.dumps(sorted(a.state_dict())) == json.dumps(sorted(b.state_dict()))


def _channels():
    from bnprobe.models.allcnn import layer_channels

    return layer_channels(3, 0.1)
