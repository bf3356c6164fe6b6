"""measure leaves the model exactly as it was and handles every BN flavour."""

import pytest
import torch
import torchvision
from torch import nn

from bnprobe.errors import BnprobeError
from bnprobe.measure import Measurements, measure
from bnprobe.models import AllCNN


def _snapshot(model):
    return ({n: m.training for n, m in model.named_modules()},
            {n: b.clone() for n, b in model.named_buffers()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: p.clone() for n, p in model.named_parameters()})


def _no_hooks(model):
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def _assert_same(model, snap):
    flags, buffers, grads, params = _snapshot(model)
    assert flags == snap[0] and grads == snap[2]
    assert all(torch.equal(buffers[k], snap[1][k]) for k in buffers)
    assert all(torch.equal(params[k], snap[3][k]) for k in params)
    assert _no_hooks(model)


@pytest.mark.parametrize("mode", ["joint", "isolated"])
def test_model_state_unchanged(mode):
    model = AllCNN(num_classes=3, width=0.1)
    model.train()
    model.features[2].eval()
    model.features[0].conv.weight.requires_grad_(False)
    snap = _snapshot(model)
    measure(model, torch.randn(40, 3, 8, 8), [4, 8], samples=3, mode=mode)
    _assert_same(model, snap)


def test_state_restored_after_an_error_mid_forward():
    model = AllCNN(num_classes=3, width=0.1).eval()
    snap = _snapshot(model)
    with pytest.raises(RuntimeError):
        measure(model, torch.randn(20, 4, 8, 8), [4], samples=2)  # wrong channel count
    _assert_same(model, snap)


def test_round_trip(tmp_path):
    model = AllCNN(num_classes=3, width=0.1)
    m = measure(model, torch.randn(30, 3, 8, 8), [4, 8], samples=3, spatial_fractions=[0.5],
                source={"checkpoint": "x.pt"})
    m.save(tmp_path / "m")
    back = Measurements.load(tmp_path / "m")
    assert back.samples.equals(m.samples) and back.reference.equals(m.reference)
    assert back.meta == m.meta and back.meta["format"] == "bnprobe.measurements"
    assert list(back.layers["name"]) == list(m.layers["name"])
    assert back.meta["config"]["batch_sizes"] == [4, 8]


def test_bad_inputs():
    model = AllCNN(num_classes=3, width=0.1)
    data = torch.randn(10, 3, 8, 8)
    with pytest.raises(BnprobeError, match="no BatchNorm"):
        measure(AllCNN(num_classes=3, width=0.1, norm="none"), data, [4])
    with pytest.raises(BnprobeError, match="too small"):
        measure(model, data, [1])
    with pytest.raises(BnprobeError, match="larger than the data"):
        measure(model, data, [11])
    with pytest.raises(BnprobeError, match="'nothing.*'"):
        measure(model, data, [4], layers="nothing.*")
    with pytest.raises(BnprobeError, match="'sideways'"):
        measure(model, data, [4], mode="sideways")
    with pytest.raises(Exception, match="not found"):
        Measurements.load("/nonexistent/folder")


def test_layer_selection_stops_early():
    model = AllCNN(num_classes=3, width=0.1)
    m = measure(model, torch.randn(30, 3, 8, 8), [4], samples=2, layers="features.2.*")
    assert list(m.layers["name"]) == ["features.2.norm"]


class _Tabular(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_batchnorm1d_on_a_dataset():
    ds = torch.utils.data.TensorDataset(torch.randn(50, 5), torch.zeros(50))
    m = measure(_Tabular(), ds, [4, 16], samples=5)
    assert set(m.samples["spatial_size"]) == {1} and m.layers["channels"].iloc[0] == 6


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "mobilenet_v2"])
def test_torchvision_models(name):
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    snap = _snapshot(model)
    m = measure(model, torch.randn(12, 3, 32, 32), [4], samples=2, reference_size=12)
    assert len(m.layers) == n_bn
    assert m.samples["u"].notna().all() and (m.samples["u"] > 0).all()
    _assert_same(model, snap)
