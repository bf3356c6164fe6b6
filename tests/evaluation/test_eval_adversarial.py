from __future__ import annotations

import pytest
import torch
from torch import nn

from bnprobe.errors import BnprobeError
from bnprobe.evaluation import fgsm, gaussian_noise, robustness_curve


class _Linear(nn.Module):
    def __init__(self, d=4, k=3):
        super().__init__()
        self.lin = nn.Linear(d, k)

    def forward(self, x):
        return torch.log_softmax(self.lin(x), dim=1)


def _setup():
    gen = torch.Generator().manual_seed(0)
    model = _Linear()
    with torch.no_grad():
        model.lin.weight.copy_(torch.randn(3, 4, generator=gen))
        model.lin.bias.copy_(torch.randn(3, generator=gen))
    x = torch.randn(8, 4, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    return model, x, y


def test_fgsm_matches_manual_gradient():
    model, x, y = _setup()
    # manual: logits = x W^T + b; d(mean NLL)/dx = (softmax - onehot) W / N
    logits = x @ model.lin.weight.detach().T + model.lin.bias.detach()
    p = torch.softmax(logits, dim=1)
    onehot = torch.nn.functional.one_hot(y, 3).float()
    grad = (p - onehot) @ model.lin.weight.detach() / x.shape[0]
    eps = 0.05
    x_adv = fgsm(model, x, y, eps)
    torch.testing.assert_close(x_adv, x + eps * grad.sign())
    nonzero = grad != 0
    assert nonzero.all()
    assert torch.allclose((x_adv - x).abs()[nonzero], torch.tensor(eps), atol=1e-6)
    assert not x_adv.requires_grad
    assert not x.requires_grad
    # FGSM increases the loss
    nll = torch.nn.functional.nll_loss
    assert nll(model(x_adv), y) > nll(model(x), y)


def test_fgsm_zero_gradient_entries_do_not_move():
    model, x, y = _setup()
    with torch.no_grad():
        model.lin.weight[:, 2] = 0.0  # input feature 2 does not affect the output
    x_adv = fgsm(model, x, y, 0.1)
    assert torch.equal(x_adv[:, 2], x[:, 2])
    assert torch.allclose((x_adv - x).abs()[:, [0, 1, 3]], torch.tensor(0.1), atol=1e-6)


def test_fgsm_leaves_grads_and_mode():
    model, x, y = _setup()
    model.eval()
    fgsm(model, x, y, 0.1)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    model.train()
    model.lin.weight.grad = torch.ones_like(model.lin.weight)
    fgsm(model, x, y, 0.1)
    assert torch.equal(model.lin.weight.grad, torch.ones_like(model.lin.weight))
    assert model.lin.bias.grad is None
    assert model.training


def test_fgsm_input_requiring_grad_and_no_grad_context():
    model, x, y = _setup()
    x_req = x.clone().requires_grad_(True)
    with torch.no_grad():
        x_adv = fgsm(model, x_req, y, 0.1)
    assert x_req.grad is None
    assert not x_adv.requires_grad
    torch.testing.assert_close(x_adv, fgsm(model, x, y, 0.1))


def test_gaussian_noise_generator_and_std():
    x = torch.zeros(20000)
    a = gaussian_noise(x, 0.5, torch.Generator().manual_seed(1))
    b = gaussian_noise(x, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.std().item() == pytest.approx(0.5, rel=0.03)
    assert torch.equal(gaussian_noise(x, 0.0), x)


def test_robustness_curve_includes_clean_accuracy():
    model, x, y = _setup()
    model.eval()
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    clean = (model(x).argmax(1) == y).float().mean().item()
    curve = robustness_curve(
        model,
        iter(batches),
        kinds={"gaussian": [0.5, 0.1], "fgsm": [0.2]},
        generator=torch.Generator().manual_seed(0),
    )
    assert list(curve.columns) == ["attack", "strength", "accuracy"]
    assert curve["attack"].tolist() == ["gaussian"] * 3 + ["fgsm"] * 2
    assert curve["strength"].tolist() == [0.0, 0.1, 0.5, 0.0, 0.2]
    zero = curve[curve["strength"] == 0]
    assert zero["accuracy"].tolist() == pytest.approx([clean, clean])
    fgsm_acc = curve[(curve["attack"] == "fgsm") & (curve["strength"] == 0.2)]["accuracy"]
    x_adv = torch.cat([fgsm(model, bx, by, 0.2) for bx, by in batches])
    expected = (model(x_adv).argmax(1) == y).float().mean().item()
    assert fgsm_acc.item() == pytest.approx(expected)
    assert all(p.grad is None for p in model.parameters())


def test_robustness_curve_bad_attack():
    model, x, y = _setup()
    with pytest.raises(BnprobeError, match="pgd"):
        robustness_curve(model, [(x, y)], kinds={"pgd": [0.1]})
