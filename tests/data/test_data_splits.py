import torch

from bnprobe.data import DataSpec, make_splits, train_val_split
from bnprobe.data.digits import load_digits


def test_split_is_deterministic_disjoint_and_complete():
    a_train, a_val = train_val_split(1000, 0.1, seed=3)
    b_train, b_val = train_val_split(1000, 0.1, seed=3)
    assert torch.equal(a_train, b_train) and torch.equal(a_val, b_val)
    assert len(a_val) == 100 and len(a_train) == 900
    assert len(set(a_train.tolist()) | set(a_val.tolist())) == 1000
    assert not set(a_train.tolist()) & set(a_val.tolist())
    _, c_val = train_val_split(1000, 0.1, seed=4)
    assert not torch.equal(a_val, c_val)


def test_digits_has_fixed_seeded_test_split():
    a, b = load_digits(), load_digits()
    assert len(a.train_x) + len(a.test_x) == 1797
    assert len(a.test_x) == round(0.2 * 1797)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_y, b.train_y)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert a.train_x.dtype == torch.uint8 and int(a.train_x.max()) == 255
    assert a.flip is False


def test_limit_train_is_a_seeded_subset(tiny_data):
    spec = DataSpec.from_data(tiny_data)
    full = make_splits(tiny_data, spec)
    s1 = make_splits(tiny_data, spec, limit_train=20, generator=torch.Generator().manual_seed(1))
    s2 = make_splits(tiny_data, spec, limit_train=20, generator=torch.Generator().manual_seed(1))
    assert len(s1.train) == 20 and torch.equal(s1.train.images, s2.train.images)
    assert len(full.val) == round(0.1 * 96) and len(full.test) == 32


def test_batches_are_normalized_with_training_statistics(tiny_data):
    spec = DataSpec.from_data(tiny_data)
    splits = make_splits(tiny_data, spec)
    x, y = splits.train.batch(torch.arange(len(splits.train)))
    ref = (splits.train.images.double() / 255 - torch.tensor(spec.mean).view(1, -1, 1, 1)) / \
        torch.tensor(spec.std).view(1, -1, 1, 1)
    assert torch.allclose(x.double(), ref, atol=1e-5)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
