from __future__ import annotations

import torch
from torch import nn

from bnprobe.norms.an import ANConv2d
from bnprobe.norms.projection import (
    param_groups_no_decay,
    project_scale_invariant_,
    project_unit_norm_,
    scale_invariant_weights,
)
from bnprobe.norms.wn import WNConv2d, WNLinear


class _Block(nn.Module):
    """The conv/norm naming convention (like bnprobe.norms.ConvNorm)."""

    def __init__(self, conv, norm):
        super().__init__()
        self.conv, self.norm = conv, norm

    def forward(self, x):
        return self.norm(self.conv(x))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            _Block(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)),  # invariant
            nn.LeakyReLU(0.01),
            _Block(WNConv2d(6, 6, 3, padding=1), nn.Identity()),  # invariant
            nn.Conv2d(6, 5, 1, bias=True),  # invariant: followed by BN in the Sequential
            nn.BatchNorm2d(5),
            _Block(nn.Conv2d(5, 4, 1), nn.Identity()),  # NOT invariant: no normalization
            nn.ReLU(),
        )
        self.an = ANConv2d(4, 4, 1)  # invariant
        self.head = nn.Linear(4, 3)  # NOT invariant
        self.wn_head = WNLinear(3, 2)  # invariant

    def forward(self, x):
        f = self.features(x)
        self.an.propagate(torch.zeros(4), torch.ones(4))
        return self.wn_head(self.head(self.an(f).mean(dim=(2, 3))))


def _expected(net):
    f = net.features
    return {id(p) for p in (f[0].conv.weight, f[2].conv.weight, f[3].weight, net.an.weight,
                            net.wn_head.weight)}  # fmt: skip


def test_scale_invariant_weights_finds_exactly_the_invariant_ones():
    net = _Net()
    found = scale_invariant_weights(net)
    assert {id(p) for p in found} == _expected(net)
    assert len(found) == len(_expected(net))  # no duplicates


def test_projection_unit_norm_and_leaves_other_parameters():
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0).add_(0.1)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    invariant = _expected(net)
    norms = project_unit_norm_(scale_invariant_weights(net))
    assert len(norms) == len(invariant) and all((n - 1).abs().max() > 0.1 for n in norms)
    for name, p in net.named_parameters():
        if id(p) in invariant:
            row_norms = p.detach().flatten(1).norm(dim=1)
            torch.testing.assert_close(row_norms, torch.ones_like(row_norms))
        else:
            assert torch.equal(p.detach(), before[name]), name


def test_projection_keeps_outputs_in_train_and_eval_mode():
    torch.manual_seed(1)
    net = _Net().double()
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(3):
            net(x)  # populate BN running statistics
        for w in scale_invariant_weights(net):
            w.mul_(torch.rand(w.shape[0], *([1] * (w.dim() - 1)), dtype=w.dtype) * 3 + 1.0)
        net.train()
        y_train = net(x)
        net.eval()
        y_eval = net(x)
        net.train()
        project_scale_invariant_(net)
        for w in scale_invariant_weights(net):
            torch.testing.assert_close(
                w.flatten(1).norm(dim=1), torch.ones(w.shape[0], dtype=w.dtype)
            )
        net.eval()
        y_eval2 = net(x)
        net.train()
        y_train2 = net(x)
    torch.testing.assert_close(y_train2, y_train, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_eval2, y_eval, rtol=1e-4, atol=1e-5)


def test_param_groups_no_decay():
    net = _Net()
    groups = param_groups_no_decay(net, 5e-4)
    by_name = {g["name"]: g for g in groups}
    assert by_name["decay"]["weight_decay"] == 5e-4
    assert by_name["no_decay"]["weight_decay"] == 0.0
    assert {id(p) for p in by_name["no_decay"]["params"]} == _expected(net)
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in net.parameters())
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    assert len(opt.param_groups) == 2
    plain = nn.Sequential(nn.Linear(2, 2))
    assert [g["name"] for g in param_groups_no_decay(plain, 1e-4)] == ["decay"]


def test_model_may_implement_the_protocol_with_the_function():
    class Wrapper(_Net):
        def scale_invariant_weights(self):
            return scale_invariant_weights(self)

    net = Wrapper()
    assert {id(p) for p in net.scale_invariant_weights()} == _expected(net)
    outer = nn.Sequential(net)
    assert {id(p) for p in scale_invariant_weights(outer)} == _expected(net)


class _Residual(nn.Module):
    """A torchvision-style block: conv -> BN pairs that are neither Sequential nor conv/norm."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3, eps=1e-12)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3, eps=1e-12)
        self.side, self.bn3 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)  # NOT invariant: used twice

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        side = self.side(x)
        return torch.relu(out + x) + self.bn3(side) + side


def test_graph_pairs_of_a_residual_block_are_found_and_projection_keeps_outputs():
    torch.manual_seed(2)
    net = _Residual().double()
    assert {id(p) for p in scale_invariant_weights(net)} == {id(net.conv1.weight), id(net.conv2.weight)}
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(3):
            net(x)
        for w in (net.conv1.weight, net.conv2.weight):
            w.mul_(torch.rand(3, 1, 1, 1, dtype=w.dtype) * 3 + 1.0)
        y_train, y_eval = net(x), net.eval()(x)
        project_scale_invariant_(net.train())
        norms = net.conv2.weight.flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones(3, dtype=torch.float64))
        torch.testing.assert_close(net.eval()(x), y_eval)
        torch.testing.assert_close(net.train()(x), y_train)
