"""The quickstart pipeline: every stage of bnprobe on the bundled digits data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import BnprobeError
from .io import atomic_write_json

MARKER = ".bnprobe-quickstart"

# Settings that reach >= 95% test accuracy on digits in well under a minute on 2 CPU cores.
DIGITS_TRAIN = {"dataset": "digits", "width": 0.5, "epochs": 30, "lr": 0.05, "lr_decay_epochs": 15.0}


@dataclass
class QuickstartResult:
    """Where the quickstart put its results.

    Attributes:
        out: The output folder.
        files: Named result files.
        metrics: Headline numbers (e.g. test accuracy).
    """

    out: Path
    files: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise BnprobeError(f"{out} exists and is not a quickstart folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()


def _train_stage(out: Path, name: str, options: dict, device: str, seed: int,
                 progress: bool, log: Callable[[str], None]):
    """Train (or resume, or reuse) one run of the quickstart."""
    from .checkpoint import open_checkpoint
    from .training import TrainConfig, train

    run_dir = out / name
    config = TrainConfig(seed=seed, device=device, **options)
    ckpt = run_dir / "checkpoint.pt"
    if ckpt.exists():
        done = open_checkpoint(ckpt)
        if done.payload and int(done.payload["epoch"]) >= config.epochs:
            log(f"[{name}] already trained, reusing {ckpt}")
            return done.model, done.payload["history"]
        log(f"[{name}] resuming")
        result = train(config, run_dir, resume=True, progress=progress, log=log)
    else:
        log(f"[{name}] training {options.get('norm', 'bn')} All-CNN on {config.dataset}")
        result = train(config, run_dir, progress=progress, log=log)
    return result.model, result.history


def run_quickstart(out: str | Path = "bnprobe-quickstart", device: str = "auto", seed: int = 0,
                   progress: bool = True, log: Callable[[str], None] | None = None) -> QuickstartResult:
    """Run the quickstart on digits; an interrupted quickstart resumes where it stopped.

    Args:
        out: Output folder (created; a folder that is not a quickstart folder is refused).
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: Seed of every stage.
        progress: Show progress bars.
        log: Called with progress lines.

    Returns:
        The files written and headline metrics.
    """
    from .data import DataSpec, load_dataset, make_splits
    from .options import resolve_device
    from .training import loss_and_accuracy

    log = log or (lambda _m: None)
    out = Path(out)
    _prepare_out(out)
    result = QuickstartResult(out)
    dev = resolve_device(device)
    data = load_dataset("digits")
    model, _ = _train_stage(out, "bn", {**DIGITS_TRAIN, "norm": "bn"}, str(dev), seed, progress, log)
    splits = make_splits(data, DataSpec.from_data(data), dev)
    test_loss, test_acc = loss_and_accuracy(model.to(dev), splits.test)
    result.metrics.update({"bn_test_accuracy": test_acc, "bn_test_nll": test_loss})
    result.files.update({"BN run (checkpoint, metrics.csv, config.json)": out / "bn"})
    summary = out / "quickstart.json"
    atomic_write_json(summary, {"format": "bnprobe.quickstart", "version": 1,
                                "metrics": result.metrics,
                                "files": {k: str(v) for k, v in result.files.items()}})
    result.files["summary"] = summary
    return result
