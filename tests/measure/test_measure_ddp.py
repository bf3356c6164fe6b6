"""``measure`` under torchrun (2 gloo processes) against one process.

The statistical check: for each layer, batch size and statistic (V, U), the layer variance
(the channel mean of the per-channel variances over draws, as in summary.csv) of the
2-process draws against the 1-process draws. A layer's variance is the mean over draws of
``q_d = n/(n-1) mean_c (x_dc - xbar_c)^2``; the draws are i.i.d. batches, so the ``q_d`` are
(up to the O(1/n) centring) i.i.d. whatever the correlation between channels, and
``z = (mean q_a - mean q_b) / sqrt(var q_a / n_a + var q_b / n_b)`` is N(0, 1) under "same
distribution" (a two-sample z-test of the variance). The z of independent seeds are combined
as ``sum z / sqrt(S)``. The two sides agree when no two-sided p-value is below
``ALPHA / m`` for the m (layer, k, statistic) cells (Bonferroni: a false alarm with
probability at most ALPHA, whatever the dependence between layers). The test rejects draws
whose deviations are scaled by 1.25 (synthetic and real), so it can fail.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bnprobe.errors import BnprobeError
from bnprobe.measure.pipeline import measure_checkpoint
from bnprobe.measure.recorder import Recorder

SAMPLES = 100
SEEDS = (0, 1, 2)
ALPHA = 1e-3
FILES = {"samples.parquet", "layers.csv", "reference.parquet", "meta.json", "summary.csv", "fitted.json"}


def _per_draw(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    return ((x - x.mean(0)) ** 2).mean(1) * n / (n - 1)


def variance_z(a: np.ndarray, b: np.ndarray) -> float:
    """z of the layer variance of draws ``a`` minus that of ``b`` (each draws x channels)."""
    qa, qb = _per_draw(a), _per_draw(b)
    return float((qa.mean() - qb.mean()) / math.sqrt(qa.var(ddof=1) / len(qa) + qb.var(ddof=1) / len(qb)))


def _cells(samples: pd.DataFrame, scale: float = 1.0) -> dict:
    """(layer, k, statistic) -> draws x channels, deviations from the channel means times ``scale``."""
    out = {}
    for (layer, k), t in samples[samples["fraction"] == 1.0].groupby(["layer", "batch_size"]):
        for stat in ("v", "u"):
            x = t.pivot(index="draw", columns="channel", values=stat).to_numpy()
            out[(layer, int(k), stat)] = x.mean(0) + scale * (x - x.mean(0))
    return out


def compare(one: list[pd.DataFrame], two: list[pd.DataFrame], scale: float = 1.0) -> pd.Series:
    """Two-sided p-value per (layer, k, statistic), z combined over the seeds (pairs of tables)."""
    z = {}
    for a, b in zip(one, two):
        ca, cb = _cells(a), _cells(b, scale)
        for key in ca:
            z.setdefault(key, []).append(variance_z(cb[key], ca[key]))
    combined = pd.Series({key: sum(v) / math.sqrt(len(v)) for key, v in z.items()})
    return pd.Series(2 * stats.norm.sf(combined.abs()), index=combined.index)


def consistent(p: pd.Series) -> bool:
    """No p-value below ALPHA / m (Bonferroni)."""
    return bool(p.min() >= ALPHA / len(p))


def _correlated(rng, draws, channels=16, scale=1.0):
    """Draws x channels with correlated channels (a shared factor), deviations times ``scale``."""
    return scale * (0.8 * rng.normal(size=(draws, 1)) + 0.6 * rng.normal(size=(draws, channels)))


def _synthetic(rng, draws, scale=1.0, layers=4, channels=16):
    """A samples table of made-up draws."""
    frames = []
    for layer in range(layers):
        v, u = _correlated(rng, draws, channels, scale), _correlated(rng, draws, channels, scale)
        frames.append(pd.DataFrame({
            "layer": f"l{layer}", "batch_size": 8, "fraction": 1.0,
            "draw": np.repeat(np.arange(draws), channels), "channel": np.tile(np.arange(channels), draws),
            "v": v.reshape(-1), "u": 1 + u.reshape(-1)}))
    return pd.concat(frames, ignore_index=True)


def test_variance_z_is_calibrated():
    rng = np.random.default_rng(1)
    z = np.array([variance_z(_correlated(rng, SAMPLES), _correlated(rng, SAMPLES)) for _ in range(2000)])
    p = 2 * stats.norm.sf(np.abs(z))
    assert 0.035 < (p < 0.05).mean() < 0.065  # uniform p-values: 5% below 0.05 (+-3 SE)
    assert 0.4 < (p < 0.5).mean() < 0.6


def test_variance_test_keeps_equal_and_rejects_scaled_draws():
    rng = np.random.default_rng(0)
    one = [_synthetic(rng, SAMPLES) for _ in SEEDS]
    same = [_synthetic(rng, SAMPLES) for _ in SEEDS]
    wider = [_synthetic(rng, SAMPLES, scale=1.25) for _ in SEEDS]
    assert consistent(compare(one, same))
    assert not consistent(compare(one, wider))
    assert not consistent(compare(one, same, scale=1.25))  # the scaling used on the real draws


def _measure(run, out, seed, *extra):
    return {"argv": ["measure", run, "--batch-sizes", "8,32", "--samples", SAMPLES, "--seed", seed,
                     "--device", "cpu", "--out", out, "--quiet", *extra]}


def _interrupted_alone(run, out):
    """A 1-process measurement stopped at its third draw."""
    original, calls = Recorder.run, [0]

    def run_draw(self, model, x):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return original(self, model, x)

    Recorder.run = run_draw
    try:
        with pytest.raises(KeyboardInterrupt):
            measure_checkpoint(run, [8, 32], out=out, samples=SAMPLES, seed=SEEDS[1], device="cpu")
    finally:
        Recorder.run = original


@pytest.fixture(scope="module")
def measured(digits_bn_run, ddp_commands, tmp_path_factory):
    """1-process measurements (in this process) and 2-process ones (one torchrun job)."""
    root = tmp_path_factory.mktemp("ddp-measure")
    one = {s: measure_checkpoint(digits_bn_run, [8, 32], out=root / f"one{s}", samples=SAMPLES, seed=s,
                                 device="cpu")[0] for s in SEEDS}
    _interrupted_alone(digits_bn_run, root / "left1")
    stop = {"interrupt_after": SAMPLES // 2 + 3}  # each process: 3 draws into the second batch size
    plan = [
        {"argv": ["measure", digits_bn_run, "--batch-sizes", "100000", "--device", "cpu",
                  "--out", root / "bad", "--quiet"]},
        *[_measure(digits_bn_run, root / f"two{s}", s) for s in SEEDS],
        {**_measure(digits_bn_run, root / "resumed", SEEDS[1]), **stop},
        _measure(digits_bn_run, root / "resumed", SEEDS[1], "--resume"),
        {**_measure(digits_bn_run, root / "left", SEEDS[1]), "interrupt_after": 3},
        _measure(digits_bn_run, root / "left1", SEEDS[1], "--resume"),
    ]
    return root, one, ddp_commands(plan)


def test_bad_input_is_one_error_line_and_exit_2(measured):
    root, _, jobs = measured
    bad = jobs[0]
    assert bad["exit"] == [2, 2]
    # the ranks' streams reach torchrun through separate pipes, so rank 0's line may land after
    # rank 1's marker of the next command: look in both (the next command prints no Error)
    text = "\n".join(job[k] for job in jobs[:2] for k in ("stdout", "stderr"))
    errors = [ln for ln in text.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "larger than the data" in errors[0], errors
    assert not [ln for ln in (bad["stdout"] + bad["stderr"]).splitlines() if ln.strip()
                and not ln.startswith("Error:")]
    assert not (root / "bad").exists()


def test_two_processes_write_one_measurement(measured):
    root, one, jobs = measured
    job = jobs[1]
    assert job["exit"] == [0, 0], job["stderr"]
    out = root / f"two{SEEDS[0]}"
    assert {p.name for p in out.iterdir()} == FILES  # no progress folder, no temporary files
    assert "Error" not in job["stderr"]
    lines = job["stdout"].splitlines()
    assert sum("wrote" in ln for ln in lines) == 1 and sum("layer_index" in ln for ln in lines) == 1
    assert json.loads((out / "meta.json").read_text())["world_size"] == 2
    ref1 = one[SEEDS[0]].reference
    ref2 = pd.read_parquet(out / "reference.parquet")
    assert ref1[["layer", "channel"]].equals(ref2[["layer", "channel"]])
    np.testing.assert_allclose(ref2[["mean", "var"]], ref1[["mean", "var"]], rtol=0, atol=1e-6)
    samples = pd.read_parquet(out / "samples.parquet")
    counts = samples.groupby(["layer", "batch_size", "channel"])["draw"].agg(["nunique", "size", "max"])
    assert (counts["nunique"] == SAMPLES).all() and (counts["size"] == SAMPLES).all()
    assert (counts["max"] == SAMPLES - 1).all()
    # process 0 draws what one process draws: its half of the first batch size is the start
    # of the 1-process draws; process 1 draws others
    first = one[SEEDS[0]].samples
    keys = ["layer", "channel", "draw"]
    for rank0, same in ((True, True), (False, False)):
        a, b = ((t[(t["batch_size"] == 8) & ((t["draw"] < SAMPLES // 2) == rank0)].sort_values(keys))
                for t in (first, samples))
        assert np.allclose(b[["v", "u"]], a[["v", "u"]], rtol=0, atol=1e-6) == same


def test_two_processes_match_one_in_distribution(measured):
    root, one, _ = measured
    two = [pd.read_parquet(root / f"two{s}" / "samples.parquet") for s in SEEDS]
    ones = [one[s].samples for s in SEEDS]
    p = compare(ones, two)
    assert len(p) == 9 * 2 * 2  # layers x batch sizes x (V, U)
    assert consistent(p), p.sort_values().head()
    assert p.median() > 0.05  # not all small either
    scaled = compare(ones, two, scale=1.25)
    assert not consistent(scaled)
    assert (scaled < ALPHA / len(p)).mean() > 0.5  # most cells reject it on their own


def test_two_processes_resume_and_refuse_another_world_size(measured, digits_bn_run):
    root, _, jobs = measured
    assert jobs[4]["exit"] == [130, 130] and jobs[5]["exit"] == [0, 0], jobs[5]["stderr"]
    resumed = pd.read_parquet(root / "resumed" / "samples.parquet")
    full = pd.read_parquet(root / f"two{SEEDS[1]}" / "samples.parquet")
    pd.testing.assert_frame_equal(resumed, full)
    left = root / "left"
    assert sorted(p.name for p in (left / ".partial").iterdir()) == ["reference.pt", "state.pt"]
    with pytest.raises(BnprobeError, match="interrupted with 2 processes; resume it with 2"):
        measure_checkpoint(digits_bn_run, [8, 32], out=left, samples=SAMPLES, seed=SEEDS[1], device="cpu",
                           resume=True)
    alone = jobs[7]  # a 1-process measurement resumed by 2 processes
    assert alone["exit"] == [2, 2]
    errors = [ln for ln in (alone["stdout"] + "\n" + alone["stderr"]).splitlines() if ln.strip()]
    assert len(errors) == 1 and "interrupted with 1 process; resume it in one process" in errors[0], errors
