"""Checkpoint in, measurement folder out: what ``bnprobe measure`` and the quickstart run."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from ..checkpoint import checkpoint_path, foreign_arch_kwargs, open_checkpoint, save_checkpoint
from ..data import DataSpec, load_dataset, load_for_spec, make_splits
from ..distributed import setup, shared_errors
from ..errors import BnprobeError
from ..io import atomic_write
from ..layout import FITTED, MEASUREMENTS_DIR, META, SUMMARY
from ..options import resolve_device
from .core import _check_sizes, measure
from .fit import broken_layers, fit_noise, noise_flags
from .measurements import Measurements
from .recalibrate import recalibrate

PARTIAL_DIR = ".partial"


def default_export_batch_size(batch_sizes: Sequence[int]) -> int:
    """32 when measured, else the middle measured batch size."""
    sizes = sorted(batch_sizes)
    return 32 if 32 in sizes else sizes[len(sizes) // 2]


def measure_checkpoint(
    checkpoint: str | Path,
    batch_sizes: Sequence[int],
    out: str | Path = MEASUREMENTS_DIR,
    samples: int = 200,
    mode: str = "joint",
    reference: str = "population",
    spatial_fractions: Sequence[float] | None = None,
    layers: str | None = None,
    reference_size: int | None = None,
    augment_draws: int = 1,
    isolated_method: str = "sufficient",
    spatial_sampling: str = "independent",
    dataset: str | None = None,
    data_root: str | None = None,
    arch: str | None = None,
    num_classes: int | None = None,
    width: float | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    unsafe_load: bool = False,
    seed: int = 0,
    device: str = "auto",
    force: bool = False,
    resume: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> tuple[Measurements, pd.DataFrame | None]:
    """Measure a checkpoint on its training data and write the measurement folder.

    Writes samples.parquet, layers.csv, reference.parquet, meta.json, summary.csv and
    fitted.json (at batch size 32 when measured, else the middle batch size) into ``out``.
    Progress is kept in ``out/.partial`` after the reference pass and each batch size, so an
    interrupted run continues with ``resume`` (same settings, same result); ``force`` starts
    over.

    The measurement checks itself: every problem (stale or unusable running buffers, layers
    whose noise the Gaussian V/U model does not fit, small spatial maps) is one line to
    ``warn`` and in meta.json. A measurement that is clearly broken in some layer (see
    :func:`bnprobe.measure.fit.broken_reasons`) writes no fitted.json unless ``force``: the
    rest of the folder is written and a BnprobeError says why.

    Under torchrun (``torchrun --nproc-per-node N -m bnprobe measure ...``) the processes
    share the draws (see :func:`.core.measure`); process 0 logs and writes the folder, the
    progress included, and a resumed measurement needs the same number of processes.

    Returns:
        The measurements and their summary table (None on processes other than 0).
    """
    world, dev = setup(device)
    log = log if log is not None and world.is_main else (lambda _m: None)
    progress = progress and world.is_main
    out = Path(out)
    partial_dir = out / PARTIAL_DIR
    with shared_errors():
        if world.is_main:
            _prepare_out(out, force, resume, log)
        ckpt = open_checkpoint(checkpoint, arch=arch, num_classes=num_classes, unsafe_load=unsafe_load,
                               device=dev, arch_kwargs=foreign_arch_kwargs(width, arch_kwargs))
        name, root, data, splits = checkpoint_training_data(ckpt, dataset, data_root, dev)
        _check_sizes(sorted(batch_sizes), len(splits.train), spatial_fractions or [])
    gen = torch.Generator().manual_seed(seed)
    log(f"measuring {checkpoint} on {name} ({len(splits.train)} training images), "
        f"batch sizes {list(batch_sizes)}, {samples} draws each"
        + (f" split between {world.size} processes" if world.distributed else ""))
    source: dict[str, Any] = {
        "checkpoint": ckpt.path, "checkpoint_sha256": ckpt.sha256, "arch": ckpt.arch,
        "arch_kwargs": ckpt.arch_kwargs, "dataset": name, "data_root": root,
        "dataset_fingerprint": data.fingerprint, "input_shape": list(data.input_shape),
        "image_size": (ckpt.config or {}).get("image_size"), "seed": seed,
    }
    m = measure(ckpt.model, splits.train, batch_sizes, samples=samples, mode=mode, reference=reference,
                spatial_fractions=spatial_fractions, layers=layers, generator=gen, device=dev,
                reference_size=reference_size, augment_draws=augment_draws,
                isolated_method=isolated_method, spatial_sampling=spatial_sampling,
                progress=progress, source=source, resume_dir=partial_dir)
    if not world.is_main:
        return m, None
    summary = m.summary(seed=seed)
    summary.insert(2, "mode", m.meta["config"]["mode"])
    summary.insert(3, "reference", m.meta["config"]["reference"])
    spec_out = fit_noise(m, default_export_batch_size(m.batch_sizes), summary=summary)
    m.meta["warnings"] = [*m.meta.get("warnings", []), *noise_flags(spec_out),
                          *filter(None, [spatial_note(summary, data.input_shape)])]
    broken = broken_layers(spec_out)
    m.meta["noise_file"] = "written" if (not broken or force) else "refused: broken measurement"
    for line in m.meta["warnings"]:
        (warn or log)(line)
    m.save(out)
    atomic_write(out / SUMMARY, lambda p: summary.to_csv(p, index=False))
    shutil.rmtree(partial_dir, ignore_errors=True)
    if broken and not force:
        raise BnprobeError(f"no {FITTED} written: the measurement is broken in {len(broken)} of "
                           f"{len(spec_out.layers)} layers ({broken[0]}); the rest of {out} is written; "
                           "pass --force to write the noise file anyway")
    spec_out.save(out / FITTED)
    return m, summary


def _prepare_out(out: Path, force: bool, resume: bool, log: Callable[[str], None]) -> None:
    """Refuse to overwrite finished measurements; clear (``force``) or continue (``resume``) progress."""
    if (out / META).exists() and not force:
        raise BnprobeError(f"{out} already holds measurements; pass --force to replace them or use --out")
    partial_dir = out / PARTIAL_DIR
    if partial_dir.exists():
        if force:
            shutil.rmtree(partial_dir)
        elif not resume:
            raise BnprobeError(f"{out} holds an interrupted measurement; pass --resume to continue it "
                               "or --force to start over")
        else:
            log(f"resuming the interrupted measurement in {out}")


def spatial_note(summary: pd.DataFrame, input_shape: Sequence[int]) -> str | None:
    """A note when small inputs leave BN layers with tiny maps (an ImageNet stem on 28x28)."""
    sizes = summary.drop_duplicates("layer").sort_values("layer_index")["spatial_size"].astype(int)
    if sizes.empty or sizes.min() > 4:
        return None
    side = sorted({round(s ** 0.5) for s in sizes}, reverse=True)
    tiny = int((sizes <= 4).sum())
    return (f"with {input_shape[-2]}x{input_shape[-1]} inputs the BN layers see maps of "
            f"{', '.join(f'{s}x{s}' for s in side)}; {tiny} of {len(sizes)} layers have at most 2x2 "
            "positions, so their batch statistics come from few values (n = k x positions)")


def layer_table(summary: pd.DataFrame) -> pd.DataFrame:
    """A compact per-layer, per-batch-size table for printing (full spatial fraction)."""
    full = summary[summary["fraction"] == 1.0]
    cols = ["layer_index", "layer", "batch_size", "n", "n_eff", "n_eff_v", "n_eff_u", "sigma_v",
            "sigma_u", "v_bias_z", "u_bias_z", "ks_p", "slope_v", "slope_u"]
    return full[cols].sort_values(["layer_index", "batch_size"]).reset_index(drop=True)


def checkpoint_training_data(ckpt: Any, dataset: str | None, data_root: str | None, dev: torch.device):
    """The training data a checkpoint was trained on (or the one named), split as in training.

    Returns:
        ``(name, root, data, splits)``.
    """
    spec = ckpt.data
    name = dataset or (spec.name if spec else None)
    if name is None:
        raise BnprobeError("this checkpoint records no dataset: pass --dataset (and --data-root)")
    root = data_root or (spec.root if spec and name == spec.name else None)
    same = spec is not None and name == spec.name
    data = load_for_spec(spec, root) if same else load_dataset(name, root)
    if spec is None or name != spec.name or (data_root and spec.fingerprint != data.fingerprint):
        spec = DataSpec.from_data(data, translate=spec.translate if spec else 0)
    if spec.input_shape and list(spec.input_shape) != list(data.input_shape):
        raise BnprobeError(
            f"the model expects inputs {spec.input_shape}, the data has {list(data.input_shape)}"
        )
    return name, root, data, make_splits(data, spec, dev)


def recalibrate_checkpoint(
    checkpoint: str | Path,
    out: str | Path | None = None,
    reference_size: int | None = None,
    dataset: str | None = None,
    data_root: str | None = None,
    arch: str | None = None,
    num_classes: int | None = None,
    width: float | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    unsafe_load: bool = False,
    seed: int = 0,
    device: str = "auto",
    force: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write a copy of a checkpoint whose BN buffers hold the sequential population statistics.

    Args:
        checkpoint: A checkpoint file or run directory.
        out: The new file (default: ``<name>-precise.pt`` beside the checkpoint).
        reference_size: Training images to use (default: all).
        dataset: Override the checkpoint's dataset.
        data_root: Override the dataset folder.
        arch: Architecture of a plain state_dict.
        num_classes: Classes of a plain state_dict.
        width: All-CNN width of a plain state_dict.
        arch_kwargs: More architecture arguments of a plain state_dict.
        unsafe_load: Allow pickled checkpoints.
        seed: Seed of the subset and augmentation.
        device: Where to run.
        force: Replace ``out`` if it exists.
        progress: Show a progress bar.
        log: Receives progress lines.

    Returns:
        The path written.
    """
    log = log or (lambda _m: None)
    src = checkpoint_path(checkpoint)
    out = Path(out) if out is not None else src.with_name(f"{src.stem}-precise{src.suffix or '.pt'}")
    if out.exists() and not force:
        raise BnprobeError(f"{out} already exists; pass --force to replace it or choose --out")
    if out.resolve() == src.resolve():
        raise BnprobeError(f"--out {out} is the checkpoint itself; choose another file")
    dev = resolve_device(device)
    ckpt = open_checkpoint(checkpoint, arch=arch, num_classes=num_classes, unsafe_load=unsafe_load,
                           device=dev, arch_kwargs=foreign_arch_kwargs(width, arch_kwargs))
    name, _, _, splits = checkpoint_training_data(ckpt, dataset, data_root, dev)
    info = recalibrate(ckpt.model, splits.train, size=reference_size,
                       generator=torch.Generator().manual_seed(seed), device=dev, progress=progress)
    info.update({"dataset": name, "seed": seed, "source_sha256": ckpt.sha256})
    log(f"recalibrated {info['layers']} BN layers over {info['images']} training images of {name}")
    state = {k: v.detach().cpu() for k, v in ckpt.model.state_dict().items()}
    if ckpt.is_bnprobe:
        payload = {k: v for k, v in ckpt.payload.items() if k not in ("format", "version", "bnprobe_version")}
        payload["state_dict"] = state
        payload["precise_bn"] = info
        save_checkpoint(out, payload)
    else:
        atomic_write(out, lambda p: torch.save(state, p))
    return out
