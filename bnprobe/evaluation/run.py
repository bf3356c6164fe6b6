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
from ..data import DeviceImages, load_dataset, make_splits
from ..errors import BnprobeError
from ..io import atomic_write, atomic_write_json
from ..options import Split, resolve_device
from ..progress import progress_bar
from .adversarial import robustness_curve
from .labels import evaluation_label, method_label
from .mc import mc_average
from .metrics import summary_metrics
from .selective import Uncertainty, aurc, coverage_curve
from .stochastic import has_bn, mcbn, noise_mc, noise_modules, parametric_bn

FORMAT = "bnprobe.evaluation"
VERSION = 1
ROBUSTNESS = {"gaussian": (0.1, 0.25, 0.5, 1.0), "fgsm": (0.005, 0.01, 0.02, 0.05)}


@torch.no_grad()
def _predict(
    model: nn.Module, images: DeviceImages, batch_size: int, before: Callable[[], None] | None = None
):
    """Log-probabilities over a set (one pass), calling ``before`` first."""
    if before is not None:
        before()
    out = [
        torch.log_softmax(model(images.batch(torch.arange(s, min(s + batch_size, len(images))))[0]), 1)
        for s in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


def stochastic_mode(
    model: nn.Module, train: DeviceImages, train_batch: int, noise: Any, generator: torch.Generator
) -> tuple[str, Callable[[], Any]] | None:
    """Pick the Monte-Carlo mode of a model: injected noise, parametric BN, MCBN, or none."""
    if noise_modules(model):
        return "noise", lambda: noise_mc(model)
    if has_bn(model) and noise is not None:
        sigmas = [(torch.tensor(v), torch.tensor(u)) for v, u in noise.sigmas(per_channel=True)]
        seed = int(torch.randint(2**62, (1,), generator=generator))
        dev_gen = torch.Generator(device=train.device).manual_seed(seed)
        return "parametric-bn", lambda: parametric_bn(model, sigmas, dev_gen)
    if has_bn(model):
        aug = torch.Generator(device=train.device).manual_seed(
            int(torch.randint(2**62, (1,), generator=generator))
        )

        def draw() -> torch.Tensor:
            idx = torch.randperm(len(train), generator=generator)[:train_batch]
            return train.batch(idx, augmented=True, generator=aug)[0]

        return "mcbn", lambda: mcbn(model, draw)
    return None


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
    logps = {"single": _predict(model, images, batch_size)}
    mode = stochastic_mode(model, train, train_batch, noise, gen)
    mc = sorted({int(n) for n in mc if int(n) >= 1})
    if mc and mode is None:
        log("note: this model is deterministic (no BN, no noise): Monte-Carlo prediction = one pass, N = 1")
        mc = [1]
    if mc and mode is not None:
        kind, ctx = mode
        samples = []
        with ctx() as resample:
            for _ in progress_bar(range(max(mc)), total=max(mc), enabled=progress, desc=f"MC ({kind})"):
                samples.append(_predict(model, images, batch_size, resample))
        for n in mc:
            logps[f"mc{n}"] = mc_average(torch.stack(samples[:n]))
        results["mc_mode"] = kind
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
        batches = [
            images.batch(torch.arange(s, min(s + batch_size, len(images))))
            for s in range(0, len(images), batch_size)
        ]
        rob = robustness_curve(model, batches, ROBUSTNESS, generator=None)
    model.train(was_training)
    coverage = pd.concat(curves, ignore_index=True)[
        ["method", "uncertainty", "coverage", "error", "n_accepted"]
    ]
    return results, coverage, rob


def bn_buffers(ckpt: Any) -> str | None:
    """Which statistics a checkpoint's BN layers normalize by in evaluation mode (None: no BN)."""
    if not has_bn(ckpt.model):
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
    out = Path(out) if out is not None else path.parent / "evaluation"
    if (out / "metrics.json").exists() and not force:
        raise BnprobeError(f"{out} already holds an evaluation; pass --force to replace it or use --out")
    dev = resolve_device(device)
    ckpt = open_checkpoint(path, unsafe_load=unsafe_load, device=dev)
    if ckpt.data is None:
        raise BnprobeError(f"{path} records no dataset: evaluate needs a bnprobe checkpoint")
    if dataset is not None and dataset != ckpt.data.name:
        raise BnprobeError(f"{path} was trained on {ckpt.data.name!r}, not on {dataset!r}")
    noise_spec = None
    if noise is not None:
        from ..measure.noise_spec import NoiseSpec

        noise_spec = NoiseSpec.load(noise)
    buffers = bn_buffers(ckpt)
    if buffers and log:
        log(f"BN buffers: {buffers}")
    data = load_dataset(ckpt.data.name, ckpt.data.root)
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
    atomic_write(out / "coverage.csv", lambda p: coverage.to_csv(p, index=False))
    if rob is not None:
        atomic_write(out / "robustness.csv", lambda p: rob.to_csv(p, index=False))
    atomic_write_json(out / "metrics.json", doc)
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
