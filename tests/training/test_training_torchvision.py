"""Training torchvision networks converted to WN/AN with fixed or learned noise, and retraining them."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bnprobe.checkpoint import open_checkpoint
from bnprobe.cli.main import cli
from bnprobe.data.synthetic import make_synthetic
from bnprobe.errors import BnprobeError
from bnprobe.models import build_model
from bnprobe.noise.modules import FixedNoise, LearnedNoise
from bnprobe.noise.network import noise_modules
from bnprobe.norms import bn_sites
from bnprobe.norms.projection import scale_invariant_weights
from bnprobe.retrain import retrain
from bnprobe.training import TrainConfig, train

MODELS = ["resnet18", "resnet34", "resnet50", "vgg11_bn", "mobilenet_v2", "mobilenet_v3_small",
          "regnet_x_400mf", "densenet121", "efficientnet_b0"]
#: Models whose checkpoints the matrix reopens (one per kind of block: plain, concatenating, MBConv/SE).
REOPEN = ("resnet18", "densenet121", "efficientnet_b0")
NOISE = {"plain": {}, "fixed": {"noise": "FITTED", "noise_granularity": "channel"},
         "learned": {"learn_noise": "channel"}}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data32():
    """16 3x32x32 training images (two steps of eight), four test images."""
    return make_synthetic(n_train=16, n_test=4, channels=3, size=32, num_classes=4, seed=0)


@functools.cache
def _sites(name: str):
    return bn_sites(build_model(f"torchvision:{name}", {"num_classes": 4}))


def _sigma_v(i: int) -> float:
    """The test's sigma_v of BN layer ``i``: small (WN's noise acts on an unstandardized x_hat), distinct."""
    return 0.02 + 0.0001 * i


def _fitted(path, name: str, order=None, layers=None):
    """A fitted.json as ``bnprobe measure`` writes it for ``name``'s BN layers (layer i: ``_sigma_v(i)``)."""
    sites = _sites(name)
    entries = []
    for i, s in enumerate(sites):
        c = s.channels
        entries.append({"name": s.name, "index": i, "channels": c, "spatial_size": 4, "n": 64, "n_eff": 50.0,
                        "sigma_v": _sigma_v(i), "sigma_u": 0.02, "sigma_v_channels": [_sigma_v(i)] * c,
                        "sigma_u_channels": [0.02] * c})
    if order is not None:
        entries = [entries[i] for i in order]
    if layers is not None:
        entries = entries[:layers]
    source = {"arch": f"torchvision:{name}", "arch_kwargs": {"num_classes": 4}, "dataset": "synthetic"}
    doc = {"format": "bnprobe.noise", "version": 1, "batch_size": 8, "layers": entries, "source": source}
    path.write_text(json.dumps(doc))
    return str(path)


def _config(name: str, **kw) -> TrainConfig:
    base = dict(dataset="synthetic", arch=f"torchvision:{name}", epochs=1, lr=1e-4, batch_size=8,
                device="cpu", seed=0, eval_train_size=4, mc_every=0, augment=False)
    return TrainConfig(**{**base, **kw})


def _cases():
    for name in MODELS:
        for norm in ("wn", "an"):
            for noise in NOISE:  # vgg11_bn: 129M parameters, ~10 s a run; one variant outside `slow`
                marks = [pytest.mark.slow] if name == "vgg11_bn" and (norm, noise) != ("wn", "fixed") else []
                yield pytest.param(name, norm, noise, marks=marks, id=f"{name}-{norm}-{noise}")


@pytest.mark.parametrize("name,norm,noise", list(_cases()))
def test_train_converted(name, norm, noise, tmp_path, data32):
    kw = dict(NOISE[noise])
    if kw.get("noise") == "FITTED":
        kw["noise"] = _fitted(tmp_path / "fitted.json", name)
    result = train(_config(name, norm=norm, **kw), tmp_path / "run", data=data32)
    row = result.history[-1]
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])
    model = result.model
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    n_sites = len(_sites(name))
    kinds = {"plain": (), "fixed": FixedNoise, "learned": LearnedNoise}[noise]
    assert len([m for m in noise_modules(model) if isinstance(m, kinds or ())]) == (n_sites if kinds else 0)
    assert len(noise_modules(model)) == (n_sites if kinds else 0)
    for w in scale_invariant_weights(model):  # projected after every step
        torch.testing.assert_close(w.flatten(1).norm(dim=1), torch.ones(w.shape[0]))
    raw = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert raw["arch"]["kwargs"]["norm"] == norm
    if noise == "fixed" and name in REOPEN:  # the checkpoint rebuilds the converted model from its kwargs
        ckpt = open_checkpoint(tmp_path / "run")
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(ckpt.model(x), model(x), rtol=0, atol=0)


def test_retrain_uses_each_bn_layers_noise_by_name(tmp_path, data32):
    sites = _sites("resnet18")
    order = list(reversed(range(len(sites))))  # the file's order does not matter: names do
    fitted = _fitted(tmp_path / "fitted.json", "resnet18", order=order)
    result = retrain(tmp_path / "run", noise=fitted, norm="wn", batch_size=8, epochs=1, lr=1e-3, device="cpu",
                     eval_train_size=4, mc_every=1, mc_samples=1, data=data32)
    assert result.config.arch == "torchvision:resnet18"
    modules = dict(result.model.named_modules())
    for i, s in enumerate(sites):
        layer = modules[s.conv_name]
        assert isinstance(layer.noise, FixedNoise)
        torch.testing.assert_close(layer.noise.sigma_v, torch.full((s.channels,), _sigma_v(i)))
    assert "val_loss_mc" in result.history[-1]


def test_noise_file_must_cover_the_bn_layers(tmp_path, data32):
    short = _fitted(tmp_path / "short.json", "resnet18", layers=5)
    with pytest.raises(BnprobeError, match=r"noise file .*short.json has no noise for BN layer\(s\) layer2"):
        train(_config("resnet18", norm="wn", noise=short), tmp_path / "r1", data=data32)
    foreign = _fitted(tmp_path / "foreign.json", "resnet50")
    with pytest.raises(BnprobeError, match="is not a BN layer of the network"):
        train(_config("resnet18", norm="wn", noise=foreign), tmp_path / "r2", data=data32)
    with pytest.raises(BnprobeError, match="LayerNorm"):
        train(_config("convnext_tiny", norm="wn"), tmp_path / "r3", data=data32)


def test_none_and_bn_with_noise(tmp_path, data32):
    none = train(_config("mobilenet_v3_small", norm="none"), tmp_path / "none", data=data32).model
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in none.modules())
    fitted = _fitted(tmp_path / "fitted.json", "resnet18")
    noisy = train(_config("resnet18", norm="bn", noise=fitted), tmp_path / "bn", data=data32).model
    assert len(noise_modules(noisy)) == len(_sites("resnet18"))


def test_cli_retrain_torchvision(tmp_path):
    fitted = _fitted(tmp_path / "fitted.json", "resnet18")
    result = CliRunner().invoke(cli, [
        "retrain", "--noise", fitted, "--arch", "torchvision:resnet18", "--norm", "wn", "--epochs", "1",
        "--limit-train", "8", "--batch-size", "4", "--lr", "0.001", "--device", "cpu", "--quiet",
        "--mc-every", "0", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert open_checkpoint(tmp_path / "run").arch_kwargs["norm"] == "wn"
