"""File names and layouts of the folders bnprobe writes: the one place they are defined.

A run directory (``bnprobe train``/``retrain --out RUN_DIR``)::

    RUN_DIR/config.json       every option, version, architecture, dataset
    RUN_DIR/checkpoint.pt     bnprobe.checkpoint v1 (loads with weights_only=True)
    RUN_DIR/metrics.csv       one row per epoch
    RUN_DIR/evaluation/       ``bnprobe evaluate RUN_DIR`` (below)

An evaluation folder: ``metrics.json`` (bnprobe.evaluation v1), ``coverage.csv`` and, with
``--robustness``, ``robustness.csv``.

A measurement folder (``bnprobe measure --out measurements``): ``meta.json``,
``samples.parquet``, ``reference.parquet``, ``layers.csv``, ``summary.csv`` and
``fitted.json`` (bnprobe.noise v1); while it runs, ``partial/`` holds resumable state.
"""

from __future__ import annotations

from pathlib import Path

# run directory
CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
EVALUATION_DIR = "evaluation"

# evaluation folder
EVALUATION = "metrics.json"
COVERAGE = "coverage.csv"
ROBUSTNESS = "robustness.csv"

# measurement folder
MEASUREMENTS_DIR = "measurements"
META = "meta.json"
SAMPLES = "samples.parquet"
REFERENCE = "reference.parquet"
LAYERS = "layers.csv"
SUMMARY = "summary.csv"
FITTED = "fitted.json"
PARTIAL_STATE = "state.pt"
PARTIAL_REFERENCE = "reference.pt"


def partial_table(batch_size: int) -> str:
    """File of the finished draws at one batch size inside a measurement's ``partial/``."""
    return f"k{int(batch_size)}.parquet"


def evaluation_dir(run: str | Path) -> Path:
    """The default evaluation folder of a run directory."""
    return Path(run) / EVALUATION_DIR


def evaluation_file(run: str | Path) -> Path:
    """The evaluation document of a run directory."""
    return evaluation_dir(run) / EVALUATION
