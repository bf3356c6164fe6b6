"""``retrain_config``: defaults from the noise file's source, overrides, fallbacks."""

from __future__ import annotations

import json

import pytest

from bnprobe.errors import BnprobeError
from bnprobe.models.allcnn import layer_channels
from bnprobe.retrain import retrain, retrain_config


def _fitted(path, source):
    layers = [{"name": f"l{i}", "index": i, "channels": c, "spatial_size": 1, "n": 32, "n_eff": 30.0,
               "sigma_v": 0.1, "sigma_u": 0.1, "sigma_v_channels": [0.1] * c, "sigma_u_channels": [0.1] * c}
              for i, c in enumerate(layer_channels(4, 0.25))]
    path.write_text(json.dumps({"format": "bnprobe.noise", "version": 1, "batch_size": 32,
                                "layers": layers, "source": source}))
    return str(path)


SOURCE = {"arch": "allcnn", "arch_kwargs": {"width": 0.25, "num_classes": 4}, "dataset": "cifar10",
          "data_root": "/data/cifar"}


def test_defaults_come_from_the_source(tmp_path):
    config = retrain_config(_fitted(tmp_path / "f.json", SOURCE))
    assert (config.arch, config.width, config.dataset, config.data_root) == ("allcnn", 0.25, "cifar10",
                                                                             "/data/cifar")
    assert config.norm == "wn" and config.learn_noise == "off" and config.project is True


def test_options_override_and_data_root_follows_the_dataset(tmp_path):
    path = _fitted(tmp_path / "f.json", SOURCE)
    config = retrain_config(path, width=0.5, norm="an", learn_noise="layer", dataset="synthetic")
    got = (config.width, config.norm, config.learn_noise, config.dataset)
    assert got == (0.5, "an", "layer", "synthetic")
    assert config.data_root is None  # the source's root belongs to its own dataset
    assert retrain_config(path, data_root="/elsewhere").data_root == "/elsewhere"
    assert retrain_config(path, dataset=None, width=None).width == 0.25  # None means: not given


def test_missing_source_keys_fall_back_to_defaults(tmp_path):
    config = retrain_config(_fitted(tmp_path / "f.json", {"dataset": "synthetic"}))
    assert (config.arch, config.width, config.dataset) == ("allcnn", 1.0, "synthetic")
    config = retrain_config(_fitted(tmp_path / "g.json", {}), width=0.25)
    assert config.dataset == "digits"


def test_learned_noise_without_a_file_and_errors(tmp_path, tiny_data):
    assert retrain_config(None, learn_noise="channel", norm="an").noise is None
    with pytest.raises(BnprobeError, match="--learn-noise"):
        retrain_config(None)
    with pytest.raises(BnprobeError, match="not found"):
        retrain_config(str(tmp_path / "missing.json"))
    with pytest.raises(BnprobeError, match="retrain"):
        retrain_config(None, learn_noise="layer", colour="red")
    result = retrain(tmp_path / "run", _fitted(tmp_path / "s.json", {"dataset": "synthetic"}), data=tiny_data,
                     width=0.25, epochs=1, limit_train=32, batch_size=16, device="cpu", lr=0.005, mc_every=0)
    assert result.config.norm == "wn" and len(result.history) == 1


def test_channels_and_image_size_follow_the_bn_run(tmp_path):
    source = {**SOURCE, "dataset": "imagefolder", "input_shape": [3, 28, 28], "image_size": 28}
    path = _fitted(tmp_path / "f.json", source)
    config = retrain_config(path)
    assert (config.channels, config.image_size) == (3, 28)  # a grayscale folder fed to RGB nets
    assert retrain_config(path, channels=1).channels == 1
    other = retrain_config(path, dataset="digits")
    assert (other.channels, other.image_size) == (None, None)
