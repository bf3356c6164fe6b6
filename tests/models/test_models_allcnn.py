import pytest
import torch
from torch import nn

from bnprobe.errors import BnprobeError
from bnprobe.models import AllCNN, build_model


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (3, 8, 8)])
@pytest.mark.parametrize("width", [0.25, 0.5, 1.0])
def test_output_shapes_and_log_softmax(shape, width):
    model = AllCNN(num_classes=7, in_channels=shape[0], width=width, norm="bn")
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    assert torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-5)


def test_layer_structure_follows_the_paper():
    model = AllCNN(num_classes=10, width=1.0, norm="bn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [96, 96, 96, 192, 192, 192, 192, 192, 10]
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 1, 2, 1, 1, 1]
    assert [c.kernel_size[0] for c in convs] == [3] * 7 + [1, 1]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 9
    assert sum(isinstance(m, nn.LeakyReLU) for m in model.modules()) == 8
    assert all(c.bias is None for c in convs)
    half = AllCNN(num_classes=10, width=0.5)
    assert [m.out_channels for m in half.modules() if isinstance(m, nn.Conv2d)][0] == 48


def test_norm_none_has_biases_and_no_bn():
    model = AllCNN(norm="none")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_seeded_build_is_reproducible_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    a = build_model("allcnn", {"width": 0.25}, seed=1)
    b = build_model("allcnn", {"width": 0.25}, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_torchvision_models_and_errors():
    model = build_model("torchvision:resnet18", {"num_classes": 5})
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(BnprobeError, match="nosuchnet"):
        build_model("torchvision:nosuchnet", {})
    with pytest.raises(BnprobeError, match="unknown architecture"):
        build_model("lenet", {})
    with pytest.raises(BnprobeError, match="'weird'"):
        AllCNN(norm="weird")
