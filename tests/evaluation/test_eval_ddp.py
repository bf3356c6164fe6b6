"""``evaluate`` under torchrun (2 gloo processes, each with half the test images) against one process.

MCBN draws the same training batches on every process and the single pass is deterministic:
both must equal one process exactly. Parametric BN noise is drawn per process, so the
2-process result is another Monte Carlo draw: its NLL must lie in the prediction interval of
one-process evaluations with several seeds, ``mean +- t_{R-1, 0.9995} s sqrt(1 + 1/R)`` (R
seeds, s their sample standard deviation; a false alarm with probability 0.001).
"""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bnprobe.checkpoint import open_checkpoint
from bnprobe.evaluation.run import evaluate_checkpoint
from bnprobe.noise import NoiseSpec
from bnprobe.noise.samplers import bn_layers

NOISE_SEEDS = range(6)
MC = 10


def _noise_file(run, path, sigma=0.2):
    layers = []
    for i, (name, m) in enumerate(bn_layers(open_checkpoint(run, device="cpu").model)):
        c = m.num_features
        layers.append({"name": name, "index": i, "channels": c, "spatial_size": 1, "n": 32, "n_eff": 32.0,
                       "sigma_v": sigma, "sigma_u": sigma, "sigma_v_channels": [sigma] * c,
                       "sigma_u_channels": [sigma] * c})
    NoiseSpec(batch_size=32, layers=layers).save(path)
    return path


@pytest.fixture(scope="module")
def evaluated(digits_bn_run, ddp_commands, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-eval")
    noise = _noise_file(digits_bn_run, root / "noise.json")
    common = [digits_bn_run, "--device", "cpu", "--quiet"]
    jobs = ddp_commands([
        {"argv": ["evaluate", *common, "--mc", "3,5", "--robustness", "--out", root / "mcbn2"]},
        {"argv": ["evaluate", *common, "--mc", MC, "--noise", noise, "--out", root / "noise2"]},
    ])
    return root, noise, jobs


def _metrics(folder):
    return json.loads((folder / "metrics.json").read_text())["metrics"]


def test_single_pass_and_mcbn_equal_one_process(evaluated, digits_bn_run):
    root, _, jobs = evaluated
    assert jobs[0]["exit"] == [0, 0], jobs[0]["stderr"]
    assert {p.name for p in (root / "mcbn2").iterdir()} == {"metrics.json", "coverage.csv", "robustness.csv"}
    assert sum("wrote" in ln for ln in jobs[0]["stdout"].splitlines()) == 1  # process 0 reports
    one = evaluate_checkpoint(digits_bn_run, mc=(3, 5), robustness=True, out=root / "mcbn1", device="cpu")
    two = _metrics(root / "mcbn2")
    assert two["mc_mode"] == one["metrics"]["mc_mode"] == "mcbn"
    for method in ("single", "mc3", "mc5"):
        assert two[method] == pytest.approx(one["metrics"][method], rel=0, abs=1e-12), method
    pd.testing.assert_frame_equal(pd.read_csv(root / "mcbn2" / "coverage.csv"),
                                  pd.read_csv(root / "mcbn1" / "coverage.csv"))
    rob1, rob2 = (pd.read_csv(root / f / "robustness.csv") for f in ("mcbn1", "mcbn2"))
    exact = (rob1["attack"] == "fgsm") | (rob1["strength"] == 0)  # Gaussian inputs differ per process
    np.testing.assert_allclose(rob2.loc[exact, "accuracy"], rob1.loc[exact, "accuracy"], rtol=0, atol=1e-12)


def test_parametric_noise_within_sampling_error(evaluated, digits_bn_run):
    root, noise, jobs = evaluated
    assert jobs[1]["exit"] == [0, 0], jobs[1]["stderr"]
    two = _metrics(root / "noise2")
    assert two["mc_mode"] == "parametric-bn"
    one = [evaluate_checkpoint(digits_bn_run, mc=(MC,), noise=noise, seed=s, out=root / f"noise1-{s}",
                               device="cpu")["metrics"] for s in NOISE_SEEDS]
    assert two["single"] == pytest.approx(one[0]["single"], rel=0, abs=1e-12)
    nll = np.array([m[f"mc{MC}"]["nll"] for m in one])
    r = len(nll)
    half_width = stats.t.ppf(1 - 0.0005, r - 1) * nll.std(ddof=1) * math.sqrt(1 + 1 / r)
    assert nll.std() > 0  # the noise does vary the result
    assert abs(two[f"mc{MC}"]["nll"] - nll.mean()) < half_width, (two[f"mc{MC}"]["nll"], nll)
