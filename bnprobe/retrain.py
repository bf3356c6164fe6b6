"""``retrain``: a BN network's architecture with batch-independent normalization plus noise.

The noise is the one measured in the BN network (``--noise fitted.json``) or learned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .data import ImageData
from .errors import BnprobeError
from .noise.spec import NoiseSpec
from .options import LearnNoise, Norm
from .training import TrainConfig, TrainResult, train

__all__ = ["RETRAIN_NORM", "retrain", "retrain_config"]

#: The normalization of a retrained network unless ``norm`` is given.
RETRAIN_NORM = Norm.WN.value
# TrainConfig fields that default to the noise file's source when not given
_SOURCE_FIELDS = ("arch", "width", "dataset", "data_root", "channels", "image_size")


def _source_defaults(noise: str | Path | None) -> dict[str, Any]:
    if noise is None:
        return {}
    source = NoiseSpec.load(noise).source or {}
    kwargs = source.get("arch_kwargs") if isinstance(source.get("arch_kwargs"), dict) else {}
    found = {"arch": source.get("arch"), "width": kwargs.get("width"),
             "dataset": source.get("dataset"), "data_root": source.get("data_root")}
    shape = source.get("input_shape")
    if isinstance(shape, list) and len(shape) == 3:  # the images as the BN run saw them
        found["channels"] = int(shape[0])
    found["image_size"] = source.get("image_size")
    return {k: v for k, v in found.items() if v is not None}


def retrain_config(noise: str | Path | None = None, **options: Any) -> TrainConfig:
    """The training options of a retrain run.

    ``arch``, ``width``, ``dataset`` and ``data_root`` that are not given (or None) come from
    the noise file's ``source`` (written by ``bnprobe measure``), else from the
    :class:`TrainConfig` defaults; ``data_root`` is taken from the source only for the
    source's dataset. ``norm`` defaults to ``wn``. Any other option overrides the defaults.

    Args:
        noise: A fitted.json (format "bnprobe.noise" v1), or None for learned noise only.
        **options: :class:`TrainConfig` fields.

    Returns:
        The validated config.

    Raises:
        BnprobeError: Without noise file and learned noise, for a missing or invalid file,
            or a bad option.
    """
    options = {k: v for k, v in options.items() if v is not None or k not in _SOURCE_FIELDS}
    learn = LearnNoise.parse(options.get("learn_noise", LearnNoise.OFF.value), "learn-noise")
    if noise is None and learn is LearnNoise.OFF:
        raise BnprobeError("retrain needs --noise FITTED_JSON or --learn-noise layer|channel "
                           "(use 'bnprobe train' for a network without noise)")
    source = _source_defaults(noise)
    if "dataset" in options and options["dataset"] != source.get("dataset"):
        for key in ("data_root", "channels", "image_size"):
            source.pop(key, None)
    merged = {**source, **options}
    merged.setdefault("norm", RETRAIN_NORM)
    try:
        config = TrainConfig(noise=None if noise is None else str(noise), **merged)
    except TypeError as exc:
        raise BnprobeError(f"retrain: {exc}") from exc
    return config.validate()


def retrain(
    out: str | Path,
    noise: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    data: ImageData | None = None,
    **options: Any,
) -> TrainResult:
    """Retrain with injected (``noise``) or learned noise; see :func:`retrain_config`.

    Args:
        out: The run directory.
        noise: A fitted.json, or None (then ``learn_noise`` must be layer or channel).
        resume: Continue the run in ``out``.
        progress: Show progress bars.
        log: Called with progress lines.
        data: The dataset, if already loaded.
        **options: :class:`TrainConfig` fields overriding the defaults.

    Returns:
        The training result.
    """
    config = retrain_config(noise, **options)
    return train(config, out, resume=resume, progress=progress, log=log, data=data)
