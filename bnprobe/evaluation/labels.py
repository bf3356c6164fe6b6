"""Method labels of evaluated runs (no torch import: used by plots and reports)."""

from __future__ import annotations

from typing import Any


def method_label(config: dict[str, Any], mc_mode: str | None = None, bn_buffers: str | None = None) -> str:
    """A short method name from a run's config: norm, injected or learned noise.

    With learned noise a noise file only initializes sigma_S, so the run is labelled by its
    learned noise alone. ``mc_mode`` adds how a BN network is sampled (MCBN or parametric);
    ``bn_buffers`` (as ``evaluate`` records it) marks BN nets normalized by population buffers.
    """
    label = str(config.get("norm", "?")).upper()
    if bn_buffers and bn_buffers.startswith("population"):
        label += ", population buffers"
    learn = config.get("learn_noise")
    if learn and learn != "off":
        label += f" + learned noise ({learn})"
    elif config.get("noise"):
        label += " + fitted noise"
    if mc_mode == "mcbn":
        label += " (MC: MCBN)"
    elif mc_mode == "parametric-bn":
        label += " (MC: parametric)"
    return label


def evaluation_label(doc: dict[str, Any], with_mc: bool = True) -> str:
    """The label of an evaluation document, rebuilt from its recorded run config.

    Args:
        doc: A metrics.json document of ``bnprobe evaluate``.
        with_mc: Include how MC samples were drawn (off for single-pass figures).
    """
    config = doc.get("source", {}).get("config")
    if isinstance(config, dict) and "norm" in config:
        return method_label(config, doc.get("metrics", {}).get("mc_mode") if with_mc else None,
                            doc.get("source", {}).get("bn_buffers"))
    return str(doc.get("label", "?"))
