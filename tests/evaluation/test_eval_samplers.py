"""``evaluate_model`` once per Monte Carlo sampler, on synthetic data (fast)."""

import pytest
import torch

from bnprobe.data import DeviceImages, Normalization
from bnprobe.evaluation.run import evaluate_model
from bnprobe.models import AllCNN
from bnprobe.models.allcnn import layer_channels
from bnprobe.noise import NoiseSpec, noise_modules

CHANNELS = layer_channels(3, 0.1)


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    norm = Normalization([0.5] * 3, [0.25] * 3, 0, False)
    return DeviceImages(torch.randint(0, 255, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
                        torch.randint(0, 3, (n,), generator=g), norm)


def _spec(sigma=0.2):
    layers = [{"name": f"features.{i}.norm", "index": i, "channels": c, "spatial_size": 64, "n": 64,
               "n_eff": 64.0, "sigma_v": sigma, "sigma_u": sigma, "sigma_v_channels": [sigma] * c,
               "sigma_u_channels": [sigma] * c} for i, c in enumerate(CHANNELS)]
    return NoiseSpec(batch_size=8, layers=layers)


def _noisy_wn():
    sig = [[0.2] * c for c in CHANNELS]
    return AllCNN(num_classes=3, width=0.1, norm="wn", noise={"sigma_v": sig, "sigma_u": sig})


@pytest.mark.parametrize("case,kind", [("wn+noise", "noise"), ("bn+spec", "parametric-bn"),
                                       ("bn", "mcbn"), ("none", "deterministic")])
def test_evaluate_runs_once_per_sampler(case, kind):
    torch.manual_seed(0)
    model = {"wn+noise": _noisy_wn, "bn+spec": lambda: AllCNN(num_classes=3, width=0.1),
             "bn": lambda: AllCNN(num_classes=3, width=0.1),
             "none": lambda: AllCNN(num_classes=3, width=0.1, norm="none")}[case]()
    train, test = _images(64, 0), _images(40, 1)
    with torch.no_grad():  # BN: running statistics from a few training batches
        model.train()
        for s in range(0, 64, 16):
            model(train.batch(torch.arange(s, s + 16))[0])
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    spec = _spec() if case == "bn+spec" else None
    metrics, coverage, _ = evaluate_model(model, test, train, mc=[2, 5], train_batch=16, noise=spec,
                                          generator=torch.Generator().manual_seed(0))
    assert metrics["mc_mode"] == kind
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(not m.mc for m in noise_modules(model))
    methods = {"single", "mc1"} if kind == "deterministic" else {"single", "mc2", "mc5"}
    assert set(coverage["method"]) == methods
    for name in methods:
        assert 0 <= metrics[name]["accuracy"] <= 1 and metrics[name]["nll"] > 0
    if kind != "deterministic":  # the samples differ from the deterministic pass
        assert metrics["mc5"]["nll"] != pytest.approx(metrics["single"]["nll"], rel=1e-9)
        again, _, _ = evaluate_model(model, test, train, mc=[2, 5], train_batch=16, noise=spec,
                                     generator=torch.Generator().manual_seed(0))
        assert again["mc5"]["nll"] == metrics["mc5"]["nll"]  # reproducible from the generator
