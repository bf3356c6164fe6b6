"""Training with wn/an, fixed and learned noise, norm-batch, projection and --lr auto."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from bnprobe.checkpoint import open_checkpoint
from bnprobe.data import DataSpec, make_splits
from bnprobe.errors import BnprobeError
from bnprobe.lr_search import choose
from bnprobe.models import build_model
from bnprobe.models.allcnn import layer_channels
from bnprobe.noise.network import kl_total
from bnprobe.norms.an import InputMoments, dataset_channel_moments
from bnprobe.norms.init import data_dependent_init_
from bnprobe.norms.projection import scale_invariant_weights
from bnprobe.training import TrainConfig, train
from bnprobe.training.setup import step_hooks


def _fitted(path, num_classes=4, width=0.25, layers=9, per_channel_offset=0.0):
    entries = []
    for i, c in enumerate(layer_channels(num_classes, width)[:layers]):
        entries.append({
            "name": f"features.{2 * i}.norm", "index": i, "channels": c, "spatial_size": 16, "n": 512,
            "n_eff": 400.0, "sigma_v": 0.2, "sigma_u": 0.1, "sigma_v_channels": [0.2] * c,
            "sigma_u_channels": [0.1 + per_channel_offset * j for j in range(c)],
        })
    doc = {"format": "bnprobe.noise", "version": 1, "batch_size": 32, "layers": entries,
           "source": {"arch": "allcnn", "arch_kwargs": {"width": width, "num_classes": num_classes},
                      "dataset": "synthetic"}}
    path.write_text(json.dumps(doc))
    return str(path)


def _config(**kw):
    base = dict(dataset="synthetic", width=0.25, epochs=1, lr=0.005, lr_decay_epochs=2.0, batch_size=16,
                device="cpu", seed=3, eval_train_size=32, mc_every=1, mc_samples=2, limit_train=48)
    return TrainConfig(**{**base, **kw})


CASES = {
    "none": {"norm": "none"},
    "bn": {"norm": "bn"},
    "wn": {"norm": "wn"},
    "an": {"norm": "an"},
    "wn_fixed_channel": {"norm": "wn", "noise": "FITTED", "noise_granularity": "channel"},
    "an_fixed": {"norm": "an", "noise": "FITTED", "noise_scale": 0.5},
    "bn_fixed": {"norm": "bn", "noise": "FITTED"},
    "wn_learned": {"norm": "wn", "learn_noise": "channel", "noise": "FITTED"},
    "an_learned": {"norm": "an", "learn_noise": "layer"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_round_trip_and_projection(case, tmp_path, tiny_data):
    kw = dict(CASES[case])
    if kw.get("noise") == "FITTED":
        kw["noise"] = _fitted(tmp_path / "fitted.json", per_channel_offset=0.01)
    lines = []
    result = train(_config(**kw), tmp_path / "run", data=tiny_data, log=lines.append)
    raw = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert raw["arch"]["kwargs"]["norm"] == kw["norm"]
    ckpt = open_checkpoint(tmp_path / "run" / "checkpoint.pt")
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ckpt.model(x), result.model(x), rtol=0, atol=0)
    for a, b in zip(ckpt.model.state_dict().values(), result.model.state_dict().values()):
        assert torch.equal(a, b)
    if kw["norm"] != "none":  # projection after every step: unit norm per output unit
        weights = scale_invariant_weights(result.model)
        assert len(weights) == 9
        for w in weights:
            torch.testing.assert_close(w.flatten(1).norm(dim=1), torch.ones(w.shape[0]))
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["val_loss_mean"] == rows[0]["val_loss"]
    has_noise = "noise" in kw or "learn_noise" in kw
    assert ("val_loss_mc" in rows[0]) == has_noise
    if "learn_noise" in kw:
        assert 0 < float(rows[0]["sigma_rel_mean"]) < 1 and "sigma_rel_9" in rows[0]
        assert float(rows[0]["kl"]) > 0
        logged = [ln for ln in lines if "sigma_S/s per layer" in ln]
        assert len(logged) == len(rows) and len(logged[-1].split(":")[1].split()) == 9
    else:
        assert not any("sigma_S" in ln for ln in lines)


def test_an_input_moments_come_from_the_training_data_and_survive_the_checkpoint(tmp_path, tiny_data):
    result = train(_config(norm="an"), tmp_path / "run", data=tiny_data)
    spec = DataSpec.from_data(tiny_data)
    splits = make_splits(tiny_data, spec, "cpu", 48, torch.Generator().manual_seed(3 + 2))
    m, v = dataset_channel_moments(splits.train.images, spec.mean, spec.std)
    store = result.model.input_moments
    torch.testing.assert_close(store.mean, m.float())
    torch.testing.assert_close(store.var, v.float())
    assert not torch.allclose(store.var, torch.ones(3))
    ckpt = open_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert isinstance(ckpt.model.input_moments, InputMoments)
    torch.testing.assert_close(ckpt.model.input_moments.var, store.var, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [
    {"norm": "wn", "noise": "FITTED"},
    {"norm": "an", "learn_noise": "channel", "lr": "auto", "lr_search_steps": 2, "lr_search_trials": 3},
])
def test_resume_gives_the_same_weights_with_noise(kw, tmp_path, tiny_data):
    kw = dict(kw)
    if kw.get("noise") == "FITTED":
        kw["noise"] = _fitted(tmp_path / "fitted.json")
    straight = train(_config(epochs=3, **kw), tmp_path / "a", data=tiny_data)
    train(_config(epochs=1, **kw), tmp_path / "b", data=tiny_data)
    resumed = train(_config(epochs=3, **kw), tmp_path / "b", resume=True, data=tiny_data)
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in straight.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history]


def test_lr_auto_records_the_chosen_lr(tmp_path, tiny_data):
    result = train(_config(norm="wn", lr="auto", lr_search_steps=2, lr_search_trials=4), tmp_path / "run",
                   data=tiny_data)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    lr = record["config"]["lr"]
    assert isinstance(lr, float) and 1e-4 <= lr <= 1 and record["config"]["lr_auto"] is True
    assert record["lr_search"]["chosen_lr"] == lr and len(record["lr_search"]["trials"]) == 4
    trials = [(t["log10_lr"], t["loss"]) for t in record["lr_search"]["trials"]]
    assert 10 ** choose(trials, -4.0) == pytest.approx(lr)
    assert record["lr_search"]["steps"] == 2
    assert result.history[0]["lr"] == pytest.approx(lr)


def test_norm_batch_uses_k_samples_for_statistics_and_the_batch_for_the_loss(tiny_data):
    from bnprobe.training.steps import RunGenerators, train_epoch, training_batches

    spec = DataSpec.from_data(tiny_data, translate=0)
    splits = make_splits(tiny_data, spec, "cpu")
    # label each image by its index: image i is filled with the value i (normalization undone below)
    n = len(splits.train)
    splits.train.images = torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1).expand(n, 3, 8, 8).clone()
    gens = RunGenerators.from_seed(0, torch.device("cpu"))
    batches = list(training_batches(splits.train, 32, gens, False, norm_batch=48))
    assert len(batches) == n // 32
    for x, y in batches:
        assert x.shape[0] == 48 and y.shape[0] == 32
        ids = torch.round((x[:, 0, 0, 0] * spec.std[0] + spec.mean[0]) * 255).long()
        assert ids.unique().numel() == 48  # the 16 extra samples are other images
    model = build_model("allcnn", {"num_classes": 4, "width": 0.25, "norm": "bn"}, seed=0)
    seen_sizes = []
    model.features[0].norm.register_forward_pre_hook(lambda m, inp: seen_sizes.append(inp[0].shape[0]))
    x, y = batches[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    expected = torch.nn.functional.cross_entropy(model(x)[:32], y).item()
    alone = torch.nn.functional.cross_entropy(model(x[:32]), y).item()
    model.load_state_dict(before)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen_sizes.clear()
    loss_sum, correct, count = train_epoch(model, opt, [(x, y)])
    assert seen_sizes == [48] and count == 32
    assert loss_sum.item() / 32 == pytest.approx(expected, rel=1e-5)
    assert abs(expected - alone) > 1e-4  # the statistics really include the extra samples


def test_kl_term_is_added_per_training_sample(tiny_data):
    config = _config(norm="an", learn_noise="channel", kl_weight=2.0).validate()
    model = build_model("allcnn", {"num_classes": 4, "width": 0.25, "norm": "an", "learn_noise": "channel"})
    _, regularizer = step_hooks(model, config, 48)
    torch.testing.assert_close(regularizer(), kl_total(model) * 2.0 / 48)
    _, none = step_hooks(build_model("allcnn", {"num_classes": 4, "width": 0.25, "norm": "an"}), config, 48)
    assert none is None


@pytest.mark.parametrize("norm,kw", [("wn", {}), ("none", {}), ("wn", {"learn_noise": "layer"})])
def test_data_dependent_init_standardizes_every_layer(norm, kw):
    model = build_model("allcnn", {"num_classes": 4, "width": 0.25, "norm": norm, **kw}, seed=0)
    x = torch.randn(128, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1
    assert data_dependent_init_(model, x) == 9
    assert model.training and all(m.training for m in model.modules())  # flags restored
    outputs = []
    for block in model.features[::2]:
        block.register_forward_hook(lambda m, i, o: outputs.append(o.detach()))
    model.eval()
    with torch.no_grad():
        model(x)
    for out in outputs:
        torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(out.shape[1]), atol=1e-4, rtol=0)
        torch.testing.assert_close(out.std(dim=(0, 2, 3), unbiased=False), torch.ones(out.shape[1]),
                                   atol=1e-3, rtol=0)


@pytest.mark.parametrize("kw,match", [
    ({"norm": "none", "learn_noise": "channel"}, "needs a normalization"),
    ({"norm": "none", "noise": "x.json"}, "normalization"),
    ({"norm": "wn", "norm_batch": 64}, "norm-batch"),
    ({"norm": "bn", "norm_batch": 8}, "at least --batch-size"),
    ({"lr": "fast"}, "'auto'"),
    ({"learn_noise": "sometimes"}, "sometimes"),
    ({"noise_granularity": "pixel"}, "pixel"),
    ({"prior_std": 0.0}, "prior-std"),
    ({"mc_samples": 0}, "mc-samples"),
])
def test_bad_options(kw, match):
    with pytest.raises(BnprobeError, match=match):
        _config(**kw).validate()


def test_bad_noise_files(tmp_path, tiny_data):
    with pytest.raises(BnprobeError, match="not found"):
        train(_config(norm="wn", noise=str(tmp_path / "missing.json")), tmp_path / "r1", data=tiny_data)
    short = _fitted(tmp_path / "short.json", layers=7)
    with pytest.raises(BnprobeError, match="7 layers but the network has 9"):
        train(_config(norm="wn", noise=short), tmp_path / "r2", data=tiny_data)
    wide = _fitted(tmp_path / "wide.json", width=0.5)
    with pytest.raises(BnprobeError, match="channels"):
        train(_config(norm="an", noise=wide), tmp_path / "r3", data=tiny_data)
    assert not (tmp_path / "r2" / "checkpoint.pt").exists()


def test_projected_weights_get_no_weight_decay():
    from bnprobe.training.setup import make_optimizer

    model = build_model("allcnn", {"num_classes": 4, "width": 0.25, "norm": "wn"}, seed=0)
    invariant = {id(w) for w in scale_invariant_weights(model)}
    opt = make_optimizer(model, _config(norm="wn", weight_decay=5e-4).validate(), 0.1)
    groups = {g["name"]: g for g in opt.param_groups}
    assert {id(p) for p in groups["no_decay"]["params"]} == invariant
    assert groups["no_decay"]["weight_decay"] == 0
    assert groups["decay"]["weight_decay"] == 5e-4
    plain = make_optimizer(model, _config(norm="wn", weight_decay=5e-4, project=False).validate(), 0.1)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["weight_decay"] == 5e-4
