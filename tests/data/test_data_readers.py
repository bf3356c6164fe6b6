import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from bnprobe.data import load_dataset
from bnprobe.data.cifar10 import TRAIN_BATCHES, load_cifar10
from bnprobe.data.imagefolder import load_imagefolder
from bnprobe.errors import BnprobeError


def _write_cifar(root, per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [*TRAIN_BATCHES, "test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return written


def test_cifar10_reader_reads_the_official_pickle_format(tmp_path):
    written = _write_cifar(tmp_path)
    data = load_cifar10(tmp_path)
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    first, labels = written["data_batch_1"]
    # row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32x32
    assert torch.equal(data.train_x[0, 1], torch.from_numpy(first[0, 1024:2048].reshape(32, 32)))
    assert data.train_y[:4].tolist() == labels
    assert data.classes[3] == "c3"


def test_cifar10_reader_errors(tmp_path):
    with pytest.raises(BnprobeError, match="not found"):
        load_cifar10(tmp_path)
    _write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(BnprobeError, match="not a CIFAR-10"):
        load_cifar10(tmp_path)


def _write_folder(root, sizes=((6, 6),), per_class=3):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "ant"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                w, h = sizes[i % len(sizes)]
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_imagefolder_reads_caches_and_labels_sorted(tmp_path, monkeypatch):
    _write_folder(tmp_path / "ds")
    data = load_imagefolder(tmp_path / "ds", cache_dir=tmp_path / "cache")
    assert data.classes == ["ant", "cat"]
    assert data.train_x.shape == (6, 3, 6, 6) and data.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    img = np.array(Image.open(tmp_path / "ds" / "train" / "ant" / "0.png"))
    assert torch.equal(data.train_x[0], torch.from_numpy(img).permute(2, 0, 1))
    assert list((tmp_path / "cache").iterdir())
    import bnprobe.data.imagefolder as mod

    monkeypatch.setattr(mod, "_decode", lambda *a: (_ for _ in ()).throw(AssertionError("decoded")))
    again = load_imagefolder(tmp_path / "ds", cache_dir=tmp_path / "cache")
    assert torch.equal(again.train_x, data.train_x) and again.fingerprint == data.fingerprint


def test_imagefolder_sizes(tmp_path):
    _write_folder(tmp_path / "ds", sizes=((6, 6), (8, 5)))
    with pytest.raises(BnprobeError, match="differ in size"):
        load_imagefolder(tmp_path / "ds", cache_dir=tmp_path / "c")
    data = load_imagefolder(tmp_path / "ds", image_size=4, cache_dir=tmp_path / "c")
    assert data.input_shape == (3, 4, 4)


def test_imagefolder_missing(tmp_path):
    with pytest.raises(BnprobeError, match="not found"):
        load_imagefolder(tmp_path / "nope")
    (tmp_path / "ds" / "train" / "a").mkdir(parents=True)
    with pytest.raises(BnprobeError):
        load_imagefolder(tmp_path / "ds")


def test_unknown_dataset_named_in_error():
    with pytest.raises(BnprobeError, match="'mnist'"):
        load_dataset("mnist")


@pytest.mark.slow
def test_real_cifar10_jpegs(cifar_jpeg_root):
    data = load_imagefolder(cifar_jpeg_root, cache_dir=cifar_jpeg_root / "cache")
    assert data.train_x.shape == (50000, 3, 32, 32) and data.test_x.shape == (10000, 3, 32, 32)
    mean, std = data.channel_stats()
    assert np.allclose(mean, (0.4913, 0.4821, 0.4465), atol=2e-3)
    assert np.allclose(std, (0.2452, 0.2428, 0.2606), atol=2e-3)
