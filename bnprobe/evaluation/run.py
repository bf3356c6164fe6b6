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

from .. import distributed
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
from ..options import Split
from .adversarial import robustness_curve
from .labels import evaluation_label, method_label
from .metrics import summary_metrics
from .selective import Uncertainty, aurc, coverage_curve

FORMAT = "bnprobe.evaluation"
VERSION = 1
ROBUSTNESS_LEVELS = {"gaussian": (0.1, 0.25, 0.5, 1.0), "fgsm": (0.005, 0.01, 0.02, 0.05)}


def _input_batches(images: DeviceImages, batch_size: int, part: slice) -> list[torch.Tensor]:
    """The inputs ``part`` of the evaluation set in order, in batches (normalized once, reused)."""
    return [images.batch(torch.arange(s, min(s + batch_size, part.stop)))[0]
            for s in range(part.start, part.stop, batch_size)]


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
    device, so an evaluation is reproducible from its seed. Under torchrun every process
    draws the same MCBN batches, while injected and parametric noise is drawn independently
    per process (see :func:`~bnprobe.distributed.rank_stream`; process 0 draws what one
    process draws).
    """
    def seeded() -> torch.Generator:
        seed = int(torch.randint(2**62, (1,), generator=generator))
        return torch.Generator(device=train.device).manual_seed(seed)

    sigmas = None if noise is None else noise.sigmas(per_channel=True)
    aug = seeded()

    def draw() -> torch.Tensor:
        idx = torch.randperm(len(train), generator=generator)[:train_batch]
        return train.batch(idx, augmented=True, generator=aug)[0]

    gen = distributed.rank_stream(seeded()) if sigmas is not None or noise_modules(model) else None
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

    Under torchrun each process predicts its :func:`~bnprobe.distributed.shard_slice` of
    ``images``; the log-probabilities are gathered in order and every process returns the
    same results (see :func:`sampler_for` for the Monte Carlo draws).

    Returns:
        ``(metrics, coverage, robustness)``: metrics per method ("single" and "mc<N>"), the
        coverage curves (method, uncertainty, coverage, error), the robustness table or None.
    """
    w = distributed.world()
    log = log if log is not None and w.is_main else (lambda _m: None)
    progress = progress and w.is_main
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    with distributed.shared_errors():
        if len(images) < max(1, w.size):
            raise BnprobeError("the evaluation split is empty" if len(images) == 0 else
                               f"the evaluation split has {len(images)} images, fewer than the "
                               f"{w.size} processes")
    y = images.labels
    mine = distributed.shard_slice(len(images), w)
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
    curves = []
    batches = _input_batches(images, batch_size, mine)
    logps = {"single": distributed.all_gather_cat(_predict(model, batches))}
    sampler = sampler_for(model, train, train_batch, noise, gen)
    mc = sorted({int(n) for n in mc if int(n) >= 1})
    if mc and sampler is None:
        log("note: this model is deterministic (no BN, no noise): Monte-Carlo prediction = one pass, N = 1")
        mc = [1]
    if mc and sampler is not None:
        with distributed.shared_errors():
            sampled = mc_log_probs(model, lambda: batches, sampler, mc, progress=progress)
        for n in mc:
            logps[f"mc{n}"] = distributed.all_gather_cat(sampled[n])
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
    rob = _robustness(model, batches, y[mine], batch_size) if robustness else None
    model.train(was_training)
    coverage = pd.concat(curves, ignore_index=True)[
        ["method", "uncertainty", "coverage", "error", "n_accepted"]
    ]
    return results, coverage, rob


def _robustness(model: nn.Module, batches: Sequence[torch.Tensor], y: torch.Tensor,
                batch_size: int) -> pd.DataFrame:
    """Robustness accuracies over every process's inputs (each process attacks its own part)."""
    labelled = [(x, y[s * batch_size:(s + 1) * batch_size]) for s, x in enumerate(batches)]
    table = robustness_curve(model, labelled, ROBUSTNESS_LEVELS, generator=None)
    parts = distributed.all_gather_objects((table, len(y)))
    if len(parts) == 1:
        return parts[0][0]
    out = parts[0][0].copy()
    out["accuracy"] = sum(table["accuracy"] * n for table, n in parts) / sum(n for _, n in parts)
    return out


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

    Under torchrun the processes share the evaluation set (see :func:`evaluate_model`) and
    process 0 logs and writes.

    Returns:
        The metrics document (on every process), with ``out`` added.
    """
    world, dev = distributed.setup(device)
    log = log if log is not None and world.is_main else None
    with distributed.shared_errors():
        split_kind = Split.parse(split, "split")
        if split_kind is Split.TRAIN:
            raise BnprobeError("evaluate on --split test or val, not train")
        path = checkpoint_path(target)
        out = Path(out) if out is not None else evaluation_dir(path.parent)
        if world.is_main and (out / EVALUATION).exists() and not force:
            raise BnprobeError(f"{out} already holds an evaluation; pass --force to replace it or use --out")
        ckpt = open_checkpoint(path, unsafe_load=unsafe_load, device=dev)
        if ckpt.data is None:
            raise BnprobeError(f"{path} records no dataset: evaluate needs a bnprobe checkpoint")
        if dataset is not None and dataset != ckpt.data.name:
            raise BnprobeError(f"{path} was trained on {ckpt.data.name!r}, not on {dataset!r}")
        noise_spec = None if noise is None else NoiseSpec.load(noise)
        data = load_for_spec(ckpt.data)
        splits = make_splits(data, ckpt.data, dev)
    buffers = bn_buffers(ckpt)
    if buffers and log:
        log(f"BN buffers: {buffers}")
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
    if world.is_main:
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
