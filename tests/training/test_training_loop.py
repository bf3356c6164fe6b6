import csv
import json
import math

import pytest
import torch

from bnprobe.checkpoint import FORMAT, open_checkpoint
from bnprobe.errors import BnprobeError
from bnprobe.training import TrainConfig, train
from bnprobe.training.loop import _diverged_message


def _config(**kw):
    base = dict(dataset="synthetic", width=0.25, epochs=2, lr=0.05, lr_decay_epochs=2.0,
                batch_size=16, device="cpu", seed=3, eval_train_size=32)
    return TrainConfig(**{**base, **kw})


def test_run_dir_files_and_metrics(tmp_path, tiny_data):
    result = train(_config(), tmp_path / "run", data=tiny_data)
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for col in ("lr", "train_loss", "train_acc", "train_eval_loss", "val_loss", "val_acc", "seconds"):
        assert col in rows[0]
    assert float(rows[1]["lr"]) == pytest.approx(0.05 * 0.1 ** 0.5, rel=1e-4)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["config"]["seed"] == 3 and cfg["bnprobe_version"]
    assert len(cfg["data"]["fingerprint"]) == 64
    assert len(result.history) == 2 and not result.model.training


def test_checkpoint_loads_with_weights_only(tmp_path, tiny_data):
    result = train(_config(epochs=1), tmp_path / "run", data=tiny_data)
    raw = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert raw["format"] == FORMAT and raw["version"] == 1 and raw["epoch"] == 1
    for key in ("arch", "state_dict", "data", "config", "optimizer", "rng", "history"):
        assert key in raw
    ckpt = open_checkpoint(tmp_path / "run" / "checkpoint.pt")
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(ckpt.model(x), result.model(x))
    assert ckpt.data.num_classes == 4 and ckpt.data.input_shape == [3, 8, 8]


def test_resume_gives_the_same_weights(tmp_path, tiny_data):
    straight = train(_config(epochs=3), tmp_path / "a", data=tiny_data)
    train(_config(epochs=1), tmp_path / "b", data=tiny_data)
    resumed = train(_config(epochs=3), tmp_path / "b", resume=True, data=tiny_data)
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in straight.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history]


def test_existing_run_is_not_overwritten_and_resume_checks_options(tmp_path, tiny_data):
    train(_config(epochs=1), tmp_path / "run", data=tiny_data)
    with pytest.raises(BnprobeError, match="already holds a run"):
        train(_config(epochs=1), tmp_path / "run", data=tiny_data)
    with pytest.raises(BnprobeError, match="lr"):
        train(_config(epochs=2, lr=0.1), tmp_path / "run", resume=True, data=tiny_data)
    with pytest.raises(BnprobeError, match="not found"):
        train(_config(), tmp_path / "nothing", resume=True, data=tiny_data)


def test_nan_loss_stops_and_says_what_is_kept(tmp_path, tiny_data):
    train(_config(epochs=1, norm="none"), tmp_path / "run", data=tiny_data)
    with pytest.raises(BnprobeError, match="became") as info:
        train(_config(epochs=1, norm="none", lr=1e30), tmp_path / "run2", data=tiny_data)
    assert "no checkpoint was written" in str(info.value) and "epoch 1 at lr 1e+30" in str(info.value)
    assert not (tmp_path / "run2" / "checkpoint.pt").exists()
    later = _diverged_message(math.nan, 3, 0.05, tmp_path / "run")
    assert f"{tmp_path / 'run' / 'checkpoint.pt'} (after epoch 3) is kept" in later and "epoch 4" in later


def test_default_schedule_is_recorded_and_kept_when_a_run_is_extended(tmp_path, tiny_data):
    short = _config(epochs=2)
    short.lr_decay_epochs = None
    train(short, tmp_path / "run", data=tiny_data)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert cfg["lr_decay_epochs"] == 1.0
    longer = _config(epochs=3)
    longer.lr_decay_epochs = None
    result = train(longer, tmp_path / "run", resume=True, data=tiny_data)
    assert [r["lr"] for r in result.history] == pytest.approx([0.05, 0.005, 0.0005])


def test_batch_larger_than_training_set(tmp_path, tiny_data):
    with pytest.raises(BnprobeError, match="fewer than --batch-size"):
        train(_config(batch_size=500), tmp_path / "run", data=tiny_data)
