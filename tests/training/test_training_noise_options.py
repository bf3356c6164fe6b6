"""Learned noise: its own optimizer group, --noise-init, --noise-scale, resume, validation."""

from __future__ import annotations

import json

import pytest
import torch

from bnprobe.checkpoint import open_checkpoint
from bnprobe.errors import BnprobeError
from bnprobe.models import build_model
from bnprobe.models.allcnn import layer_channels
from bnprobe.noise.network import learned_noise_modules, learned_noise_parameters, relative_sigmas
from bnprobe.norms.projection import scale_invariant_weights
from bnprobe.options import NOISE_ADAM_LR
from bnprobe.training import TrainConfig, train
from bnprobe.training.setup import NOISE_GROUP, OptimizerChain, make_optimizer


def _config(**kw):
    base = dict(dataset="synthetic", width=0.25, epochs=2, lr=0.005, lr_decay_epochs=2.0, batch_size=16,
                seed=3, device="cpu", eval_train_size=32, mc_every=0, limit_train=48, norm="an",
                learn_noise="channel")
    return TrainConfig(**{**base, **kw})


def _model(norm="an", learn="channel"):
    kwargs = {"num_classes": 4, "width": 0.25, "norm": norm, "learn_noise": learn}
    return build_model("allcnn", kwargs, seed=0)


def _groups(optimizer):
    return {g["name"]: g for g in optimizer.param_groups}


@pytest.mark.parametrize("project", [True, False])
def test_noise_parameters_get_their_own_adam_group_without_decay(project):
    model = _model()
    opt = make_optimizer(model, _config(weight_decay=5e-4, project=project).validate(), 0.005)
    assert isinstance(opt, OptimizerChain)  # SGD for the weights, Adam for the noise
    assert [type(o).__name__ for o in opt.optimizers] == ["SGD", "Adam"]
    groups = _groups(opt)
    noise = groups[NOISE_GROUP]
    assert noise["weight_decay"] == 0 and noise["lr"] == noise["initial_lr"] == NOISE_ADAM_LR
    assert {id(p) for p in noise["params"]} == {id(p) for p in learned_noise_parameters(model)}
    assert len(noise["params"]) == 2 * 9  # u and s of nine layers
    assert groups["decay"]["weight_decay"] == 5e-4 and groups["decay"]["lr"] == 0.005
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # every parameter once
    if project:
        invariant = {id(w) for w in scale_invariant_weights(model)}
        assert {id(p) for p in groups["no_decay"]["params"]} == invariant


def test_same_optimizer_kind_is_one_optimizer_and_sgd_noise_follows_lr():
    model = _model()
    opt = make_optimizer(model, _config(noise_optimizer="sgd").validate(), 0.005)
    assert isinstance(opt, torch.optim.SGD) and _groups(opt)[NOISE_GROUP]["lr"] == 0.005
    opt = make_optimizer(model, _config(noise_optimizer="sgd", noise_lr=0.1).validate(), 0.005)
    assert _groups(opt)[NOISE_GROUP]["lr"] == 0.1
    opt = make_optimizer(model, _config(optimizer="adam").validate(), 0.001)
    assert isinstance(opt, torch.optim.Adam) and _groups(opt)[NOISE_GROUP]["lr"] == NOISE_ADAM_LR
    plain = make_optimizer(_model(learn="off"), _config(learn_noise="off").validate(), 0.005)
    assert NOISE_GROUP not in _groups(plain)


def test_schedule_scales_every_group_and_the_noise_moves(tmp_path, tiny_data):
    result = train(_config(epochs=3, noise_init=0.02), tmp_path / "run", data=tiny_data)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    sgd, adam = ckpt["optimizer"]["optimizers"]
    assert [g["lr"] for g in sgd["param_groups"]] == pytest.approx([0.0005] * len(sgd["param_groups"]))
    (noise,) = adam["param_groups"]
    assert noise["lr"] == pytest.approx(0.1 * NOISE_ADAM_LR) and noise["weight_decay"] == 0
    assert len(adam["state"]) == 18  # Adam moments of u and s survive in the checkpoint
    record = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    got = (record["noise_init"], record["noise_lr"], record["noise_optimizer"])
    assert got == (0.02, NOISE_ADAM_LR, "adam")
    first = result.history[0]
    assert first["sigma_rel_1"] != pytest.approx(0.02, rel=1e-3)  # 9 Adam steps moved it
    assert 0.01 < first["sigma_rel_1"] < 0.04


@pytest.mark.parametrize("norm", ["an", "wn"])
def test_noise_init_sets_every_channel_relative_to_s(norm, tmp_path, tiny_data):
    result = train(_config(norm=norm, epochs=1, noise_init=0.3, noise_lr=1e-12), tmp_path / "run",
                   data=tiny_data)
    for layer in learned_noise_modules(result.model):  # wn: data-dependent init changed s, not the ratio
        ratio = layer.sigma().detach() / layer.scale.detach().abs()
        torch.testing.assert_close(ratio, torch.full_like(ratio, 0.3), rtol=1e-3, atol=0)
    assert relative_sigmas(result.model) == pytest.approx([0.3] * 9, rel=1e-3)


def _fitted(path, sigma_u=0.1):
    layers = [{"name": f"l{i}", "index": i, "channels": c, "spatial_size": 1, "n": 32, "n_eff": 30.0,
               "sigma_v": 0.1, "sigma_u": sigma_u, "sigma_v_channels": [0.1] * c,
               "sigma_u_channels": [sigma_u] * c}
              for i, c in enumerate(layer_channels(4, 0.25))]
    path.write_text(json.dumps({"format": "bnprobe.noise", "version": 1, "batch_size": 32, "layers": layers,
                                "source": {"dataset": "synthetic"}}))
    return str(path)


def test_noise_scale_multiplies_the_files_sigmas_that_start_learned_noise(tmp_path, tiny_data):
    fitted = _fitted(tmp_path / "f.json", sigma_u=0.1)
    result = train(_config(epochs=1, noise=fitted, noise_scale=2.5, noise_lr=1e-12), tmp_path / "run",
                   data=tiny_data)
    assert relative_sigmas(result.model) == pytest.approx([0.25] * 9, rel=1e-3)


def test_resume_with_learned_noise_restores_both_optimizers(tmp_path, tiny_data):
    straight = train(_config(epochs=3), tmp_path / "a", data=tiny_data)
    train(_config(epochs=1), tmp_path / "b", data=tiny_data)
    resumed = train(_config(epochs=3), tmp_path / "b", resume=True, data=tiny_data)
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert open_checkpoint(tmp_path / "b" / "checkpoint.pt").payload["epoch"] == 3


def test_a_checkpoint_with_other_optimizer_groups_cannot_resume(tmp_path, tiny_data):
    train(_config(epochs=1), tmp_path / "run", data=tiny_data)
    path = tmp_path / "run" / "checkpoint.pt"
    raw = torch.load(path, weights_only=True)
    raw["optimizer"] = raw["optimizer"]["optimizers"][0]  # like a version without the noise group
    torch.save(raw, path)
    with pytest.raises(BnprobeError, match="optimizer state does not fit"):
        train(_config(epochs=2), tmp_path / "run", resume=True, data=tiny_data)


@pytest.mark.parametrize("kw,match", [
    ({"learn_noise": "off", "noise_init": 0.1}, "--noise-init is a setting of learned noise"),
    ({"learn_noise": "off", "noise_lr": 0.1}, "--noise-lr is a setting of learned noise"),
    ({"noise_scale": 2.0}, "--noise-scale scales the sigmas of a noise file"),
    ({"noise": "f.json", "noise_scale": 2.0, "noise_init": 0.1}, "give one of them"),
    ({"noise_init": 0.0}, "--noise-init must be positive"),
    ({"noise_lr": -1.0}, "--noise-lr must be positive"),
    ({"noise_optimizer": "rmsprop"}, "noise-optimizer"),
])
def test_bad_noise_options(kw, match):
    with pytest.raises(BnprobeError, match=match):
        _config(**kw).validate()
