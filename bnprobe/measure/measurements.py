"""``Measurements``: the tidy result of ``measure``, saved as Parquet/CSV/JSON with provenance."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import BnprobeError
from ..io import atomic_write, atomic_write_json
from ..layout import LAYERS, META, REFERENCE, SAMPLES

FORMAT = "bnprobe.measurements"
VERSION = 1
SAMPLE_COLUMNS = ["layer", "layer_index", "channel", "batch_size", "spatial_size", "fraction",
                  "draw", "v", "u"]
LAYER_COLUMNS = ["name", "index", "channels", "spatial_size", "eps", "ref_mean", "ref_var"]


@dataclass
class Measurements:
    """V and U samples of BN layers, with the layers' reference statistics.

    Attributes:
        samples: Tidy table, one row per (layer, batch size, fraction, draw, channel):
            layer, layer_index, channel, batch_size, spatial_size, fraction, draw, v, u.
        layers: One row per layer: name, index, channels, spatial_size, eps, and the channel
            means of the reference mean and variance (ref_mean, ref_var).
        reference: Per channel reference statistics: layer, channel, mean, var.
        meta: Provenance: format, version, bnprobe version, creation time, config, source.
    """

    samples: pd.DataFrame
    layers: pd.DataFrame
    reference: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self, n_boot: int = 500, seed: int = 0) -> pd.DataFrame:
        """Per (layer, batch size, fraction): variances, n_eff, KS tests and scaling slopes."""
        import numpy as np

        from ..stats import summarize

        return summarize(self.samples, np.random.default_rng(seed), n_boot=n_boot)

    def spatial_summary(self, n_boot: int = 500, seed: int = 0) -> pd.DataFrame:
        """Per (layer, batch size): slopes of log variance against log spatial size."""
        import numpy as np

        from ..stats import summarize_spatial

        return summarize_spatial(self.samples, np.random.default_rng(seed), n_boot=n_boot)

    @property
    def batch_sizes(self) -> list[int]:
        """Measured batch sizes, ascending."""
        return sorted(int(k) for k in self.samples["batch_size"].unique())

    def save(self, directory: str | Path) -> Path:
        """Write samples.parquet, layers.csv, reference.parquet and meta.json (atomically)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / SAMPLES, lambda p: self.samples.to_parquet(p, index=False))
        atomic_write(d / REFERENCE, lambda p: self.reference.to_parquet(p, index=False))
        atomic_write(d / LAYERS, lambda p: self.layers.to_csv(p, index=False))
        atomic_write_json(d / META, self.meta)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> Measurements:
        """Read a directory written by ``save``."""
        d = Path(directory)
        if not d.is_dir():
            raise BnprobeError(f"measurements folder not found: {d} (run bnprobe measure first)")
        try:
            meta = json.loads((d / META).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BnprobeError(f"{d} is not a measurements folder (meta.json unreadable)") from exc
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise BnprobeError(f"{d}/meta.json is not {FORMAT} version {VERSION}")
        try:
            samples = pd.read_parquet(d / SAMPLES)
            reference = pd.read_parquet(d / REFERENCE)
            layers = pd.read_csv(d / LAYERS)
        except (OSError, ValueError) as exc:
            raise BnprobeError(f"{d}: cannot read measurement tables: {exc}") from exc
        missing = [c for c in SAMPLE_COLUMNS if c not in samples.columns]
        if missing:
            raise BnprobeError(f"{d}/samples.parquet lacks columns {missing}")
        return cls(samples, layers, reference, meta)
