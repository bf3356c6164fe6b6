"""Data as users have it: grayscale folders, --channels, --augment, plain All-CNN state_dicts."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from bnprobe.checkpoint import open_checkpoint
from bnprobe.cli.main import cli
from bnprobe.data import DataSpec, load_dataset
from bnprobe.data.imagefolder import load_imagefolder
from bnprobe.errors import BnprobeError
from bnprobe.models import AllCNN
from bnprobe.options import Augment
from bnprobe.training import TrainConfig, train


def _digits_folder(root, n=24, size=12, mode="L", seed=0):
    """An image folder of ``size``x``size`` PNGs in PIL ``mode`` (L: grayscale), 3 classes."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("test", n // 2)):
        for i in range(count):
            folder = root / split / f"d{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            shape = (size, size) if mode == "L" else (size, size, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")
    return root


def test_grayscale_folder_keeps_one_channel_and_no_flips(tmp_path):
    data = load_imagefolder(_digits_folder(tmp_path / "g"), cache_dir=tmp_path / "c")
    assert data.input_shape == (1, 12, 12) and data.flip is False
    rgb = load_imagefolder(_digits_folder(tmp_path / "rgb", mode="RGB"), cache_dir=tmp_path / "c")
    assert rgb.input_shape == (3, 12, 12) and rgb.flip is True
    (tmp_path / "rgb" / "bnprobe.json").write_text(json.dumps({"flip": False}))
    assert load_imagefolder(tmp_path / "rgb", cache_dir=tmp_path / "c").flip is False
    (tmp_path / "rgb" / "bnprobe.json").write_text(json.dumps({"flip": "no"}))
    with pytest.raises(BnprobeError, match="flip"):
        load_imagefolder(tmp_path / "rgb", cache_dir=tmp_path / "c")


def test_with_channels_converts_and_refuses_other_counts(tmp_path):
    gray = load_imagefolder(_digits_folder(tmp_path / "g"), cache_dir=tmp_path / "c")
    rgb = gray.with_channels(3)
    assert rgb.input_shape == (3, 12, 12) and torch.equal(rgb.train_x[:, 2], gray.train_x[:, 0])
    back = rgb.with_channels(1)
    assert torch.equal(back.train_x, gray.train_x)  # luminance of equal R, G, B is the value
    assert gray.with_channels(None) is gray and gray.with_channels(1) is gray
    with pytest.raises(BnprobeError, match="1 <-> 3"):
        gray.with_channels(2)


def test_one_channel_folder_trains_allcnn_with_one_input_channel(tmp_path):
    root = _digits_folder(tmp_path / "g", n=48)
    config = TrainConfig(dataset="imagefolder", data_root=str(root), width=0.1, epochs=1, batch_size=8,
                         device="cpu", eval_train_size=8)
    result = train(config, tmp_path / "run")
    assert result.model.features[0].conv.in_channels == 1
    ckpt = open_checkpoint(tmp_path / "run")
    assert ckpt.data.input_shape == [1, 12, 12] and ckpt.data.flip is False


def test_torchvision_on_grayscale_asks_for_channels_3(tmp_path):
    root = _digits_folder(tmp_path / "g", n=16, size=32)
    args = ["train", "--dataset", "imagefolder", "--data-root", str(root), "--arch", "torchvision:resnet18",
            "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "r"), "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "--channels 3" in result.output
    result = CliRunner().invoke(cli, [*args, "--channels", "3", "--out", str(tmp_path / "r3")])
    assert result.exit_code == 0, result.output
    assert open_checkpoint(tmp_path / "r3").data.input_shape == [3, 32, 32]


@pytest.mark.parametrize("choice,translate,flip,augment", [
    ("auto", 2, None, True), ("none", 2, None, False), ("translate", 2, False, True),
    ("flip", 0, True, True), ("translate+flip", 2, True, True)])
def test_augment_choices(choice, translate, flip, augment):
    config = TrainConfig(**Augment.parse(choice).settings())
    assert (config.translate, config.flip, config.augment) == (translate, flip, augment)


def test_augment_reaches_the_data_spec(tmp_path):
    data = load_dataset("digits")
    assert DataSpec.from_data(data).flip is False  # digits declare no flips
    assert DataSpec.from_data(data, flip=True).flip is True
    runner = CliRunner()
    base = ["train", "--dataset", "digits", "--limit-train", "64", "--width", "0.1", "--epochs", "1",
            "--batch-size", "16", "--quiet"]
    assert runner.invoke(cli, [*base, "--augment", "flip", "--out", str(tmp_path / "f")]).exit_code == 0
    spec = open_checkpoint(tmp_path / "f").data
    assert spec.flip is True and spec.translate == 0
    bad = runner.invoke(cli, [*base, "--augment", "mirror", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "mirror" in bad.output


def test_measure_a_plain_allcnn_state_dict_with_width(tmp_path):
    model = AllCNN(num_classes=10, in_channels=1, width=0.5)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    runner = CliRunner()
    args = ["measure", str(tmp_path / "plain.pt"), "--arch", "allcnn", "--dataset", "digits",
            "--batch-sizes", "8", "--samples", "4", "--reference-size", "64", "--quiet"]
    for i, extra in enumerate([[], ["--width", "0.5"], ["--arch-kwarg", "width=0.5"]]):
        result = runner.invoke(cli, [*args, *extra, "--out", str(tmp_path / f"m{i}")])
        assert result.exit_code == 0, result.output  # width read from the first conv, or given
        assert (tmp_path / f"m{i}" / "fitted.json").is_file()
    wrong = runner.invoke(cli, [*args, "--width", "0.25", "--out", str(tmp_path / "w")])
    lines = wrong.output.strip().splitlines()
    assert wrong.exit_code == 2 and len(lines) == 1 and "--width" in lines[0] and len(lines[0]) < 400
    bad = runner.invoke(cli, [*args, "--arch-kwarg", "width", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output
