"""``fitted.json`` (format "bnprobe.noise", version 1): per-layer BN noise levels."""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import BnprobeError
from ..io import atomic_write_json, read_json

FORMAT = "bnprobe.noise"
VERSION = 1
LAYER_FIELDS = ["name", "index", "channels", "spatial_size", "n", "n_eff", "sigma_v", "sigma_u",
                "sigma_v_channels", "sigma_u_channels"]


@dataclass
class NoiseSpec:
    """Fitted noise levels of each BN layer at one batch size.

    Attributes:
        batch_size: The batch size the sigmas describe.
        layers: One dict per layer in network order with name, index, channels,
            spatial_size, n, n_eff, sigma_v, sigma_u (layer values: square root of the
            channel-mean variance), sigma_v_channels, sigma_u_channels (per channel), and the
            KS results (ks_stat, ks_p of the nominal model; ks_stat_fit, ks_p_fit of the fit).
            Optional: measured_batch_size, the bias checks v_bias_z, v_bias_frac4, u_bias_z,
            mean_u, eu_model (null when not finite) and ``flags`` (a list of warnings).
        source: Provenance (checkpoint path and sha256, arch, dataset, mode, ...).
        created: ISO timestamp.
        bnprobe_version: Version that wrote it.
    """

    batch_size: int
    layers: list[dict[str, Any]]
    source: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    bnprobe_version: str = __version__

    def __post_init__(self) -> None:
        if not self.created:
            self.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    def to_dict(self) -> dict[str, Any]:
        """The JSON document."""
        return {"format": FORMAT, "version": VERSION, "bnprobe_version": self.bnprobe_version,
                "created": self.created, "source": self.source, "batch_size": self.batch_size,
                "layers": self.layers}

    def save(self, path: str | Path) -> Path:
        """Write atomically as JSON."""
        validate_noise_document(self.to_dict(), str(path))
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> NoiseSpec:
        """Read and validate a noise file; any problem is one clear BnprobeError."""
        doc = read_json(path, "noise file")
        validate_noise_document(doc, str(path))
        return cls(batch_size=int(doc["batch_size"]), layers=list(doc["layers"]),
                   source=dict(doc.get("source", {})), created=str(doc.get("created", "")),
                   bnprobe_version=str(doc.get("bnprobe_version", "")))

    def sigmas(self, per_channel: bool = False) -> list[tuple[list[float], list[float]]]:
        """Per layer ``(sigma_v, sigma_u)`` as lists of channel values (layer value repeated)."""
        out = []
        for layer in self.layers:
            if per_channel:
                out.append((list(layer["sigma_v_channels"]), list(layer["sigma_u_channels"])))
            else:
                c = int(layer["channels"])
                out.append(([float(layer["sigma_v"])] * c, [float(layer["sigma_u"])] * c))
        return out


def _finite_nonneg(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and value >= 0


def validate_noise_document(doc: Any, where: str = "noise file") -> None:
    """Raise a BnprobeError naming the first problem of a noise document."""
    if not isinstance(doc, dict):
        raise BnprobeError(f"{where}: not a JSON object")
    if doc.get("format") != FORMAT:
        raise BnprobeError(f"{where}: format is {doc.get('format')!r}, expected {FORMAT!r}")
    if doc.get("version") != VERSION:
        raise BnprobeError(f"{where}: version {doc.get('version')!r} is not supported (expected {VERSION})")
    for key in ("batch_size", "layers"):
        if key not in doc:
            raise BnprobeError(f"{where}: missing field {key!r}")
    if not isinstance(doc["layers"], list) or not doc["layers"]:
        raise BnprobeError(f"{where}: 'layers' must be a non-empty list")
    for i, layer in enumerate(doc["layers"]):
        if not isinstance(layer, dict):
            raise BnprobeError(f"{where}: layer {i} is not an object")
        for key in LAYER_FIELDS:
            if key not in layer:
                raise BnprobeError(f"{where}: layer {i} lacks field {key!r}")
        name = layer["name"]
        flags = layer.get("flags", [])
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise BnprobeError(f"{where}: layer {name}: 'flags' must be a list of strings")
        for key in ("sigma_v", "sigma_u"):
            if not _finite_nonneg(layer[key]):
                raise BnprobeError(f"{where}: layer {name}: {key} = {layer[key]!r} is not a finite, "
                                   "non-negative number")
        for key in ("sigma_v_channels", "sigma_u_channels"):
            values = layer[key]
            if not isinstance(values, list) or len(values) != int(layer["channels"]):
                raise BnprobeError(f"{where}: layer {name}: {key} must list {layer['channels']} values")
            bad = [v for v in values if not _finite_nonneg(v)]
            if bad:
                raise BnprobeError(f"{where}: layer {name}: {key} has a non-finite or negative "
                                   f"value {bad[0]!r}")
