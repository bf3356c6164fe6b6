"""``evaluate_checkpoint``: accuracy, NLL, MC prediction, calibration, robustness.

Also selective prediction (coverage curves), on the test (or validation) split.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from torch import nn

from .._version import __version__
from ..checkpoint import checkpoint_path, open_checkpoint
from ..data import DeviceImages, load_for_spec, make_splits
from ..errors import BnprobeError
from ..io import atomic_write, atomic_write_json
from ..layout import COVERAGE, EVALUATION, ROBUSTNESS, evaluation_dir
from ..noise.mc import mc_log_probs
from ..noise.network import noise_modules
from ..noise.samplers import Sampler, bn_layers, choose_sampler
from ..noise.spec import NoiseSpec
from ..options import Split, resolve_device
from .adversarial import robustness_curve
from .labels import evaluation_label, method_label
from .metrics import summary_metrics
from .selective import Uncertainty, aurc, coverage_curve

FORMAT = "bnprobe.evaluation"
VERSION = 1
ROBUSTNESS_LEVELS = {"gaussian": (0.1, 0.25, 0.5, 1.0), "fgsm": (0.005, 0.01, 0.02, 0.05)}


def _input_batches(images: DeviceImages, batch_size: int) -> list[torch.Tensor]:
    """The evaluation inputs in order, in batches (normalized once, reused by every pass)."""
    return [images.batch(torch.arange(s, min(s + batch_size, len(images))))[0]
            for s in range(0, len(images), batch_size)]


@torch.no_grad()
def _predict(model: nn.Module, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """Log-probabilities of one pass over the batches."""
    return torch.cat([torch.log_softmax(model(x), 1) for x in batches])


def sampler_for(
    model: nn.Module, train: DeviceImages, train_batch: int, noise: NoiseSpec | None,
    generator: torch.Generator,
) -> Sampler | None:
    """The Monte Carlo sampler of a model: injected noise, parametric BN, MCBN, or None.

    MCBN draws batches of ``train_batch`` augmented training images; the batches and the
    noise draws follow ``generator`` (CPU) through generators seeded from it on the data's
    device, so an evaluation is reproducible from its seed.
    """
    def seeded() -> torch.Generator:
        seed = int(torch.randint(2**62, (1,), generator=generator))
        return torch.Generator(device=train.device).manual_seed(seed)

    sigmas = None if noise is None else noise.sigmas(per_channel=True)
    aug = seeded()

    def draw() -> torch.Tensor:
        idx = torch.randperm(len(train), generator=generator)[:train_batch]
        return train.batch(idx, augmented=True, generator=aug)[0]

    gen = seeded() if sigmas is not None or noise_modules(model) else None
    return choose_sampler(model, sigmas, draw, gen)


def evaluate_model(
    model: nn.Module,
    images: DeviceImages,
    train: DeviceImages,
    mc: Sequence[int] = (10, 30),
    train_batch: int = 32,
    noise: Any = None,
    robustness: bool = False,
    generator: torch.Generator | None = None,
    batch_size: int = 500,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame | None]:
    """Evaluate a model: single pass, Monte-Carlo predictions, calibration, coverage, robustness.

    Returns:
        ``(metrics, coverage, robustness)``: metrics per method ("single" and "mc<N>"), the
        coverage curves (method, uncertainty, coverage, error), the robustness table or None.
    """
    log = log or (lambda _m: None)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if len(images) == 0:
        raise BnprobeError("the evaluation split is empty")
    y = images.labels
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
    curves = []
    batches = _input_batches(images, batch_size)
    logps = {"single": _predict(model, batches)}
    sampler = sampler_for(model, train, train_batch, noise, gen)
    mc = sorted({int(n) for n in mc if int(n) >= 1})
    if mc and sampler is None:
        log("note: this model is deterministic (no BN, no noise): Monte-Carlo prediction = one pass, N = 1")
        mc = [1]
    if mc and sampler is not None:
        sampled = mc_log_probs(model, lambda: batches, sampler, mc, progress=progress)
        for n in mc:
            logps[f"mc{n}"] = sampled[n]
        results["mc_mode"] = sampler.kind
    elif mc:
        logps["mc1"] = logps["single"]
        results["mc_mode"] = "deterministic"
    for name, logp in logps.items():
        row = summary_metrics(logp, y)
        for kind in Uncertainty:
            curve = coverage_curve(logp, y, kind)
            row[f"aurc_{kind.value}"] = aurc(curve)
            curves.append(curve.assign(method=name, uncertainty=kind.value))
        results[name] = row
    rob = None
    if robustness:
        labelled = [(x, y[s * batch_size:(s + 1) * batch_size]) for s, x in enumerate(batches)]
        rob = robustness_curve(model, labelled, ROBUSTNESS_LEVELS, generator=None)
    model.train(was_training)
    coverage = pd.concat(curves, ignore_index=True)[
        ["method", "uncertainty", "coverage", "error", "n_accepted"]
    ]
    return results, coverage, rob


def bn_buffers(ckpt: Any) -> str | None:
    """Which statistics a checkpoint's BN layers normalize by in evaluation mode (None: no BN)."""
    if not bn_layers(ckpt.model):
        return None
    info = (ckpt.payload or {}).get("precise_bn")
    if info:
        return f"population statistics (precise BN over {info.get('images', '?')} training images)"
    return "running averages from training (may lag the weights; see bnprobe recalibrate)"


def evaluate_checkpoint(
    target: str | Path,
    split: str = "test",
    mc: Sequence[int] = (10, 30),
    robustness: bool = False,
    noise: str | Path | None = None,
    dataset: str | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    device: str = "auto",
    unsafe_load: bool = False,
    force: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate RUN_DIR or CHECKPOINT and write metrics.json, coverage.csv (and robustness.csv).

    Args:
        target: A run directory or a checkpoint file (bnprobe format).
        split: ``test`` or ``val``.
        mc: Numbers of Monte-Carlo samples.
        robustness: Also measure accuracy under Gaussian input noise and FGSM.
        noise: fitted.json for parametric stochastic BN of a BN network.
        dataset: Expected dataset name (error if the checkpoint was trained on another).
        out: Output folder (default ``<run dir>/evaluation``).
        seed: Seed of the Monte-Carlo draws.
        device: ``auto``, ``cpu`` or ``cuda``.
        unsafe_load: Allow pickled checkpoints.
        force: Replace an existing evaluation in ``out``.
        progress: Show progress bars.
        log: Called with progress lines.

    Returns:
        The metrics document.
    """
    split_kind = Split.parse(split, "split")
    if split_kind is Split.TRAIN:
        raise BnprobeError("evaluate on --split test or val, not train")
    path = checkpoint_path(target)
    out = Path(out) if out is not None else evaluation_dir(path.parent)
    if (out / EVALUATION).exists() and not force:
        raise BnprobeError(f"{out} already holds an evaluation; pass --force to replace it or use --out")
    dev = resolve_device(device)
    ckpt = open_checkpoint(path, unsafe_load=unsafe_load, device=dev)
    if ckpt.data is None:
        raise BnprobeError(f"{path} records no dataset: evaluate needs a bnprobe checkpoint")
    if dataset is not None and dataset != ckpt.data.name:
        raise BnprobeError(f"{path} was trained on {ckpt.data.name!r}, not on {dataset!r}")
    noise_spec = None if noise is None else NoiseSpec.load(noise)
    buffers = bn_buffers(ckpt)
    if buffers and log:
        log(f"BN buffers: {buffers}")
    data = load_for_spec(ckpt.data)
    splits = make_splits(data, ckpt.data, dev)
    images = splits.test if split_kind is Split.TEST else splits.val
    gen = torch.Generator().manual_seed(seed)
    train_batch = int(ckpt.config.get("batch_size", 32))
    metrics, coverage, rob = evaluate_model(
        ckpt.model,
        images,
        splits.train,
        mc,
        train_batch,
        noise_spec,
        robustness,
        gen,
        progress=progress,
        log=log,
    )
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "bnprobe_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "checkpoint": str(path),
            "checkpoint_sha256": ckpt.sha256,
            "arch": ckpt.arch,
            "arch_kwargs": ckpt.arch_kwargs,
            "dataset": ckpt.data.name,
            "dataset_fingerprint": ckpt.data.fingerprint,
            "config": ckpt.config,
            "noise": str(noise) if noise else None,
            "bn_buffers": buffers,
        },
        "config": {
            "split": split_kind.value,
            "mc": list(mc),
            "robustness": robustness,
            "seed": seed,
            "n": len(images),
        },
        "label": method_label(ckpt.config, metrics.get("mc_mode"), buffers),
        "metrics": metrics,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / COVERAGE, lambda p: coverage.to_csv(p, index=False))
    if rob is not None:
        atomic_write(out / ROBUSTNESS, lambda p: rob.to_csv(p, index=False))
    atomic_write_json(out / EVALUATION, doc)
    doc["out"] = str(out)
    return doc


def metrics_table(docs: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The paper's Table 1: method, accuracy and NLL (single pass, MC-10, MC-30), ECE, AURC.

    MC columns are NaN where the run has no such prediction (a deterministic network).
    """
    rows = []
    for doc in docs:
        m = doc["metrics"]
        single = m["single"]
        rows.append(
            {
                "method": evaluation_label(doc),
                "accuracy": single["accuracy"],
                "accuracy_mc10": m.get("mc10", {}).get("accuracy", float("nan")),
                "accuracy_mc30": m.get("mc30", {}).get("accuracy", float("nan")),
                "nll": single["nll"],
                "nll_mc10": m.get("mc10", {}).get("nll", float("nan")),
                "nll_mc30": m.get("mc30", {}).get("nll", float("nan")),
                "ece": single["ece"],
                "aurc": single["aurc_entropy"],
            }
        )
    return pd.DataFrame(rows)
