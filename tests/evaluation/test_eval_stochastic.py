import pytest
import torch
from torch import nn

from bnprobe.data import DeviceImages, Normalization
from bnprobe.errors import BnprobeError
from bnprobe.evaluation.stochastic import mcbn, parametric_bn
from bnprobe.models import AllCNN


def _state(model):
    return (
        {n: m.training for n, m in model.named_modules()},
        {n: b.clone() for n, b in model.named_buffers()},
    )


def _same(model, snap):
    flags, bufs = _state(model)
    return (
        flags == snap[0]
        and all(torch.equal(bufs[k], snap[1][k]) for k in bufs)
        and all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    )


def test_mcbn_normalizes_with_a_training_batch_and_restores_the_model():
    model = AllCNN(num_classes=3, width=0.1)
    model.train()
    snap = _state(model)
    train = torch.randn(32, 3, 8, 8) * 2 + 1
    test = torch.randn(5, 3, 8, 8)
    chosen = []

    def draw():
        idx = torch.randperm(32)[:8]
        chosen.append(idx)
        return train[idx]

    with mcbn(model, draw) as resample:
        resample()
        got = model(test)
        assert not model.training
    # reference: the test inputs normalized with the batch statistics of the same training batch
    ref = AllCNN(num_classes=3, width=0.1)
    ref.load_state_dict(model.state_dict())
    ref.train()
    stats = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, inp, n=n: stats.__setitem__(n, torch.var_mean(inp[0], dim=(0, 2, 3), correction=0))
        )
        for n, m in ref.named_modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        ref(train[chosen[0]])
        for h in hooks:
            h.remove()
        ref.eval()
        for n, m in ref.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.copy_(stats[n][0])
                m.running_mean.copy_(stats[n][1])
        assert torch.allclose(got, ref(test), atol=1e-5)
    assert _same(model, snap)


def test_parametric_bn_draws_noise_of_the_requested_size_and_restores():
    bn = nn.BatchNorm2d(4).eval()
    model = nn.Sequential(bn)
    snap = _state(model)
    sv, su = torch.full((4,), 0.1), torch.full((4,), 0.2)
    x = torch.zeros(20000, 4, 2, 2)  # x_hat = 0: output = V * U, var = sv^2 (1 + su^2)
    with parametric_bn(model, [(sv, su)], torch.Generator().manual_seed(0)):
        y = model(x)
    per = y[:, :, 0, 0]
    assert torch.allclose(y, per[:, :, None, None].expand_as(y))  # shared over positions
    assert per.std(0).sub(0.1 * (1 + 0.04) ** 0.5).abs().max() < 0.005
    assert _same(model, snap)
    with (
        pytest.raises(BnprobeError, match="channels"),
        parametric_bn(model, [(torch.ones(3), torch.ones(3))]),
    ):
        pass


def test_evaluate_model_mc_for_deterministic_model_runs_once():
    from bnprobe.evaluation.run import evaluate_model

    model = AllCNN(num_classes=3, in_channels=3, width=0.1, norm="none")
    norm = Normalization([0.5] * 3, [0.25] * 3, 0, False)
    imgs = DeviceImages(
        torch.randint(0, 255, (40, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 3, (40,)), norm
    )
    notes = []
    metrics, coverage, rob = evaluate_model(model, imgs, imgs, mc=[10], log=notes.append)
    assert metrics["mc_mode"] == "deterministic" and "mc1" in metrics and "N = 1" in notes[0]
    full = coverage.query("method == 'single' and coverage == 1.0")
    assert full["error"].iloc[0] == pytest.approx(1 - metrics["single"]["accuracy"])
    assert rob is None
