"""The quickstart pipeline: every stage of bnprobe on the bundled digits data.

Train BN; measure at 8, 32, 128; fit; plot chi2, batch-scaling, spatial-scaling, noise;
retrain WN with the fitted noise and AN with learned noise; evaluate the three with MC-10;
report; plot curves and coverage. An interrupted quickstart resumes where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import BnprobeError
from .io import atomic_write_json
from .layout import CHECKPOINT, FITTED, MEASUREMENTS_DIR, evaluation_file

MARKER = ".bnprobe-quickstart"

# Small All-CNN on 8x8 digits: each run takes well under a minute on 2 CPU cores.
COMMON = {"dataset": "digits", "width": 0.5, "epochs": 20, "lr_decay_epochs": 10.0}
RUNS = {
    "bn": {"norm": "bn", "lr": 0.05},
    "wn_fitted_noise": {"norm": "wn", "lr": 0.005},  # + noise of measurements/fitted.json
    "an_learned_noise": {"norm": "an", "lr": 0.005, "learn_noise": "channel"},
}
MEASURE = {"batch_sizes": [8, 32, 128], "samples": 100, "spatial_fractions": [0.5]}


@dataclass
class QuickstartResult:
    """Where the quickstart put its results.

    Attributes:
        out: The output folder.
        files: Named result files.
        metrics: Headline numbers.
        report: The Markdown report table.
    """

    out: Path
    files: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    report: str = ""


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise BnprobeError(f"{out} exists and is not a quickstart folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()


def _train_stage(run_dir: Path, config: Any, data: Any, progress: bool, log: Callable[[str], None]) -> None:
    """Train (or resume, or reuse) one run."""
    from .checkpoint import open_checkpoint
    from .training import train

    ckpt = run_dir / CHECKPOINT
    if ckpt.exists():
        done = open_checkpoint(ckpt)
        if done.payload and int(done.payload["epoch"]) >= config.epochs:
            log(f"[{run_dir.name}] already trained, reusing it")
            return
        log(f"[{run_dir.name}] resuming")
        train(config, run_dir, resume=True, progress=progress, log=log, data=data)
    else:
        log(f"[{run_dir.name}] training")
        train(config, run_dir, progress=progress, log=log, data=data)


def run_quickstart(out: str | Path = "bnprobe-quickstart", device: str = "auto", seed: int = 0,
                   progress: bool = True, log: Callable[[str], None] | None = None,
                   epochs: int | None = None) -> QuickstartResult:
    """Run the whole pipeline on digits.

    Args:
        out: Output folder (created; a folder that is not a quickstart folder is refused).
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: Seed of every stage.
        progress: Show progress bars.
        log: Called with progress lines.
        epochs: Training epochs of each run (default 20, the learning rate falling tenfold
            every 10); fewer for a quick look at the pipeline, not at its numbers.

    Returns:
        The files written, headline metrics and the report table.
    """
    from .data import load_dataset
    from .evaluation.report import write_report
    from .evaluation.run import evaluate_checkpoint
    from .measure.pipeline import measure_checkpoint
    from .plots import (
        plot_batch_scaling,
        plot_chi2,
        plot_coverage,
        plot_curves,
        plot_noise,
        plot_spatial_scaling,
    )
    from .retrain import retrain_config
    from .training import TrainConfig

    log = log or (lambda _m: None)
    if epochs is not None and epochs < 1:
        raise BnprobeError(f"epochs must be at least 1, got {epochs}")
    common = {**COMMON, **({} if epochs is None else {"epochs": epochs})}
    out = Path(out)
    _prepare_out(out)
    result = QuickstartResult(out)
    data = load_dataset("digits")
    runs = {name: out / name for name in RUNS}
    fig = out / "figures"

    bn = TrainConfig(seed=seed, device=device, **common, **RUNS["bn"])
    _train_stage(runs["bn"], bn, data, progress, log)
    meas = out / MEASUREMENTS_DIR
    if not (meas / FITTED).exists():
        log("[measure] sampling BN noise at batch sizes 8, 32, 128")
        measure_checkpoint(runs["bn"] / CHECKPOINT, out=meas, seed=seed, device=device, force=True,
                           progress=progress, **MEASURE)
    fitted = meas / FITTED
    log("[plot] chi2, batch-scaling, spatial-scaling, noise")
    plot_chi2(meas, out=fig / "chi2.png")
    plot_batch_scaling(meas, out=fig / "batch_scaling.png")
    plot_spatial_scaling(meas, out=fig / "spatial_scaling.png")
    plot_noise(fitted, out=fig / "noise.png")

    wn = retrain_config(fitted, seed=seed, device=device, **common, **RUNS["wn_fitted_noise"])
    _train_stage(runs["wn_fitted_noise"], wn, data, progress, log)
    an = retrain_config(None, seed=seed, device=device, **common, **RUNS["an_learned_noise"])
    _train_stage(runs["an_learned_noise"], an, data, progress, log)

    for name, run in runs.items():
        if not evaluation_file(run).exists():
            log(f"[evaluate] {name} with MC-10")
            doc = evaluate_checkpoint(run, mc=[10], seed=seed, device=device, force=True, progress=progress)
        else:
            import json

            doc = json.loads(evaluation_file(run).read_text())
        result.metrics[f"{name}_test_accuracy"] = doc["metrics"]["single"]["accuracy"]
        result.metrics[f"{name}_test_nll_mc10"] = doc["metrics"]["mc10"]["nll"]
    result.report = write_report(list(runs.values()), out / "report.md", force=True)
    plot_curves(list(runs.values()), out=fig / "curves.png")
    plot_coverage(list(runs.values()), out=fig / "coverage.png")

    result.files.update({
        "BN run": runs["bn"], "measurements (samples, summary.csv, fitted.json)": meas,
        "WN + fitted noise run": runs["wn_fitted_noise"], "AN + learned noise run": runs["an_learned_noise"],
        "report": out / "report.md", "figures": fig,
    })
    summary = out / "quickstart.json"
    atomic_write_json(summary, {"format": "bnprobe.quickstart", "version": 1, "metrics": result.metrics,
                                "files": {k: str(v) for k, v in result.files.items()}})
    result.files["summary"] = summary
    return result
