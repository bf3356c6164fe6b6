"""Converting BN networks by their graph: torchvision models and All-CNN to WN, AN, none, noisy BN."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnprobe.errors import BnprobeError
from bnprobe.models import build_model
from bnprobe.noise.modules import FixedNoise, LearnedNoise
from bnprobe.norms import (
    ANConv2d,
    ANNorm,
    FixedNorm,
    NoisyBatchNorm2d,
    WNConv2d,
    bn_sites,
    convert_bn_network,
    normalized_channels,
    normalized_layers,
)
from bnprobe.norms.convert import align_noise
from bnprobe.norms.init import data_dependent_init_
from bnprobe.norms.projection import scale_invariant_weights

MODELS = ["resnet18", "resnet34", "resnet50", "vgg11_bn", "mobilenet_v2", "mobilenet_v3_small",
          "regnet_x_400mf", "densenet121", "efficientnet_b0"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bn_net(name: str, num_classes: int = 10) -> nn.Module:
    return build_model(f"torchvision:{name}", {"num_classes": num_classes}, seed=0)


def _noise(sites, offset: float = 0.0) -> dict:
    return {"sigma_v": [[0.1 + offset * j for j in range(s.channels)] for s in sites],
            "sigma_u": [[0.05] * s.channels for s in sites], "scale": 1.0,
            "names": [s.name for s in sites]}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _dropped_biases(sites) -> int:
    return sum(s.conv.bias.numel() for s in sites if s.paired and s.conv.bias is not None)


def _variants():
    yield "wn", None, "off"
    yield "wn", "fixed", "off"
    yield "wn", None, "channel"
    yield "an", None, "off"
    yield "an", "fixed", "layer"
    yield "an", None, "channel"


# vgg11_bn (129M parameters, 16 s) only in the slow run: its plain conv-BN pairs are covered by the others
@pytest.mark.parametrize("name", [pytest.param(m, marks=pytest.mark.slow) if m == "vgg11_bn" else m
                                  for m in MODELS])
def test_shape_and_parameter_count(name):
    bn = _bn_net(name)
    sites = bn_sites(bn)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    base = _count(bn) - _dropped_biases(sites)
    for norm, fixed, learn in _variants():
        net = convert_bn_network(bn, norm, noise=_noise(sites) if fixed else None, learn_noise=learn)
        extra = sum(m.u.numel() for m in net.modules() if isinstance(m, LearnedNoise))
        assert extra == (sum(s.channels for s in sites) if learn == "channel" else
                         len(sites) if learn == "layer" else 0)
        assert _count(net) == base + extra, (norm, fixed, learn)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
        assert not any(b for n, b in net.named_buffers() if "running" in n)
        noises = [m for m in net.modules() if isinstance(m, (FixedNoise, LearnedNoise))]
        assert len(noises) == (len(sites) if (fixed or learn != "off") else 0)
        assert normalized_channels(net) == [s.channels for s in sites]
        with torch.no_grad():
            assert net.eval()(x).shape == (2, 10)
    assert _count(bn) == _count(_bn_net(name))  # the input network is untouched (a copy is converted)


def _trained_bn(name: str, steps: int = 3) -> nn.Module:
    """A BN network after a few SGD steps: non-trivial running statistics and affines."""
    model = _bn_net(name, num_classes=5)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 3, 32, 32, generator=gen) * 2 + 0.5
        y = torch.randint(5, (8,), generator=gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "efficientnet_b0"])
def test_from_population_reproduces_bn_in_eval_mode(name):
    bn = _trained_bn(name)
    means = [m.running_mean for m in bn.modules() if isinstance(m, nn.BatchNorm2d)]
    assert max(float(rm.abs().max()) for rm in means) > 1e-2
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = bn(x)
        for norm in ("wn", "none"):
            net = convert_bn_network(bn, norm, from_population=True).eval()
            torch.testing.assert_close(net(x), ref, rtol=1e-4, atol=1e-4)
        sites = bn_sites(bn)
        noisy = convert_bn_network(bn, "wn", noise=_noise(sites, 0.001), from_population=True).eval()
        torch.testing.assert_close(noisy(x), ref, rtol=1e-4, atol=1e-4)  # noise is off in eval mode
        learned = convert_bn_network(bn, "wn", learn_noise="channel", from_population=True).eval()
        torch.testing.assert_close(learned(x), ref, rtol=1e-4, atol=1e-4)


def test_allcnn_converts_like_the_native_wn_model():
    bn = build_model("allcnn", {"num_classes": 4, "width": 0.25, "norm": "bn"}, seed=0)
    native = build_model("allcnn", {"num_classes": 4, "width": 0.25, "norm": "wn"}, seed=0)
    wn = convert_bn_network(bn, "wn")
    assert list(wn.state_dict()) == list(native.state_dict())
    assert [type(m) for m in wn.modules()] == [type(m) for m in native.modules()]
    _trained = _trained_allcnn(bn)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(convert_bn_network(_trained, "wn", from_population=True).eval()(x),
                                   _trained(x), rtol=1e-4, atol=1e-4)


def _trained_allcnn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(4)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(4, (8,), generator=gen)
        loss = F.nll_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_layer_kinds_groups_and_order():
    bn = _bn_net("mobilenet_v2")
    sites = bn_sites(bn)
    from bnprobe.layers import find_bn_layers

    assert [s.name for s in sites] == [n for n, _ in find_bn_layers(bn)]  # measure's order
    net = convert_bn_network(bn, "wn", noise=_noise(sites))
    layers = normalized_layers(net)
    assert [name for name, _ in layers] == [s.conv_name for s in sites]
    depthwise = [m for _, m in layers if m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert all(isinstance(m, WNConv2d) and isinstance(m.noise, FixedNoise) for _, m in layers)
    assert {id(w) for w in scale_invariant_weights(net)} == {id(m.weight) for _, m in layers}


def test_densenet_pre_activation_bn_becomes_a_fixed_norm():
    bn = _bn_net("densenet121")
    sites = bn_sites(bn)
    unpaired = [s for s in sites if not s.paired]
    assert unpaired[0].name == "features.denseblock1.denselayer1.norm1"
    assert "cat" in unpaired[0].note
    net = convert_bn_network(bn, "wn", learn_noise="layer")
    fixed = [m for m in net.modules() if isinstance(m, FixedNorm)]
    assert len(fixed) == len(unpaired) and all(isinstance(m.noise, LearnedNoise) for m in fixed)
    with pytest.raises(BnprobeError, match="features.denseblock1.denselayer1.norm1.*torch.cat|cat"):
        convert_bn_network(bn, "wn", unpaired="error")


def test_data_dependent_init_equals_a_bn_pass():
    """WN after the data-dependent init computes what the BN net computes in training mode on that batch."""
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    for name in ("resnet18", "densenet121"):
        bn = _bn_net(name, num_classes=4)
        wn = convert_bn_network(bn, "wn")
        assert data_dependent_init_(wn, x) == len(bn_sites(bn))
        with torch.no_grad():
            torch.testing.assert_close(wn.eval()(x), bn.train()(x), rtol=1e-3, atol=1e-3)


class _AfterAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.shared = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 6)
        self.bn1d = nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.bn(self.conv(x))
        z = self.shared(y)
        z = self.bn2(z + self.shared(z))  # BN after an addition; shared conv called twice
        return self.bn1d(self.fc(z.mean(dim=(2, 3))))


def test_unpaired_patterns_and_linear():
    model = _AfterAdd()
    sites = bn_sites(model)
    assert [(s.name, s.conv_name) for s in sites] == [("bn", "conv"), ("bn2", None), ("bn1d", "fc")]
    assert "add" in sites[1].note
    wn = convert_bn_network(model, "wn")
    assert isinstance(wn.conv, WNConv2d) and isinstance(wn.bn2, FixedNorm)
    assert type(wn.fc).__name__ == "WNLinear" and isinstance(wn.shared, nn.Conv2d)
    model.train()
    model(torch.randn(8, 3, 5, 5))
    model.eval()
    x = torch.randn(3, 3, 5, 5)
    with torch.no_grad():
        for norm in ("wn", "none"):
            torch.testing.assert_close(convert_bn_network(model, norm, from_population=True).eval()(x),
                                       model(x), rtol=1e-5, atol=1e-5)


def test_noisy_bn():
    bn = _trained_bn("resnet18")
    sites = bn_sites(bn)
    net = convert_bn_network(bn, "bn", noise=_noise(sites))
    layers = [m for m in net.modules() if isinstance(m, NoisyBatchNorm2d)]
    assert len(layers) == len(sites) and _count(net) == _count(bn)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), bn(x))
    assert convert_bn_network(bn, "bn") is bn  # nothing to do


class _GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gn = nn.GroupNorm(2, 4)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.gn(self.conv(x)))


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:
            return self.bn(self.conv(x))
        return x


class _TwiceBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.bn(self.conv(x)))


class _ReadsStats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.bn.weight[None, :, None, None]


@pytest.mark.parametrize("model,match", [
    (_GroupNormNet(), r"gn \(GroupNorm\)"),
    (_Untraceable(), "cannot trace _Untraceable"),
    (_TwiceBN(), "bn: the forward calls it 2 times"),
    (_ReadsStats(), "reads bn.weight"),
    (nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), "no BatchNorm layers"),
])
def test_refusals_name_the_module(model, match):
    with pytest.raises(BnprobeError, match=match):
        convert_bn_network(model, "wn")


def test_torchvision_refusals():
    with pytest.raises(BnprobeError, match=r"torchvision:convnext_tiny: cannot convert .*LayerNorm"):
        build_model("torchvision:convnext_tiny", {"num_classes": 3, "norm": "wn"})
    with pytest.raises(BnprobeError, match="torchvision:alexnet has no BatchNorm"):
        build_model("torchvision:alexnet", {"num_classes": 3, "norm": "wn"})
    with pytest.raises(BnprobeError, match="not none"):
        build_model("torchvision:resnet18", {"num_classes": 3, "norm": "none", "learn_noise": "layer"})
    plain = build_model("torchvision:resnet18", {"num_classes": 3, "norm": "bn"})
    assert isinstance(plain.bn1, nn.BatchNorm2d)


def test_align_noise_by_name():
    names, channels = ["a", "b", "c"], [1, 2, 3]
    noise = {"sigma_v": [[0.3] * 3, [0.1], [0.2] * 2], "sigma_u": [[0.0] * 3, [0.0], [0.0] * 2],
             "names": ["c", "a", "b"]}
    aligned = align_noise(noise, names, channels)
    assert aligned["names"] == names and aligned["sigma_v"] == [[0.1], [0.2] * 2, [0.3] * 3]
    with pytest.raises(BnprobeError, match="no noise for BN layer"):
        align_noise({**noise, "names": ["c", "a"], "sigma_v": noise["sigma_v"][:2],
                     "sigma_u": noise["sigma_u"][:2]}, names, channels)
    with pytest.raises(BnprobeError, match="'z' is not a BN layer"):
        align_noise({**noise, "names": ["c", "a", "z"]}, names, channels)
    by_position = {**noise, "names": ["0", "1", "2"], "sigma_v": [[0.1], [0.2] * 2, [0.3] * 3],
                   "sigma_u": [[0.0], [0.0] * 2, [0.0] * 3]}
    assert align_noise(by_position, names, channels) is by_position
    with pytest.raises(BnprobeError, match="channels"):
        align_noise(noise, None, channels)  # by position: c's 3 sigmas meet a 1-channel layer


def test_state_dict_round_trip_and_device_dtype():
    kwargs = {"num_classes": 4, "norm": "wn", "learn_noise": "channel"}
    a = build_model("torchvision:mobilenet_v3_small", kwargs, seed=0)
    b = build_model("torchvision:mobilenet_v3_small", kwargs, seed=1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)
    pickle.loads(pickle.dumps(a))
    bn = _bn_net("resnet18").double()
    double = convert_bn_network(bn, "wn", noise=_noise(bn_sites(bn)))
    assert {p.dtype for p in double.parameters()} == {torch.float64}
    assert {b.dtype for b in double.buffers()} == {torch.float64}


def test_an_network():
    bn = _bn_net("resnet18", num_classes=4)
    net = convert_bn_network(bn, "an", learn_noise="channel")
    assert isinstance(net.net.conv1, ANConv2d)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    net.eval()
    with torch.no_grad():
        full = net(x)
        torch.testing.assert_close(net(x[:1]), full[:1], rtol=1e-5, atol=1e-5)  # batch independent
        copied = copy.deepcopy(net)
        torch.testing.assert_close(copied(x), full)
    loss = net.train()(x).sum()
    loss.backward()
    assert net.net.conv1.weight.grad is not None
    dense = convert_bn_network(_bn_net("densenet121"), "an")
    assert any(isinstance(m, ANNorm) for m in dense.modules())
    with torch.no_grad():
        assert dense.eval()(x).shape == (3, 10)


def test_standalone_norms_take_moment_maps():
    from bnprobe.norms.moment_maps import channel_moments

    g = torch.Generator().manual_seed(7)
    m, v = torch.randn(2, 3, 4, generator=g), torch.rand(2, 3, 4, generator=g) + 0.1
    an = ANNorm(4)
    with torch.no_grad():
        an.scale.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
    out_m, out_v = an.propagate(m, v)
    assert out_m.shape == out_v.shape == (2, 3, 4)
    mu, var = channel_moments(m, v)
    torch.testing.assert_close(an._m_in, mu)
    expected_var = an.scale.detach() ** 2 * var / (var + an.eps)
    torch.testing.assert_close(channel_moments(out_m, out_v)[1], expected_var)
    x = torch.randn(5, 4, 3, 3, generator=g)
    torch.testing.assert_close(an(x), (x - mu[:, None, None]) / (var[:, None, None] + an.eps).sqrt()
                               * an.scale[:, None, None], atol=1e-6, rtol=1e-6)
    fixed = FixedNorm(4)
    assert fixed.propagate(m, v)[0].shape == (2, 3, 4)
    with pytest.raises(ValueError, match="ANNorm: m must have shape"):
        an.propagate(torch.zeros(3), torch.ones(3))
