"""``measure``: sample V and U of every BN layer over random batches."""

from __future__ import annotations

import contextlib
import datetime as _dt
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._version import __version__
from ..data.batches import DeviceImages
from ..distributed import rank_stream, shard_slice, shared_errors, world
from ..errors import BnprobeError
from ..layers import find_bn_layers, preserved_state
from ..options import IsolatedMethod, MeasureMode, Reference, SpatialSampling
from ..progress import progress_bar
from ._partial import PartialMeasurement, settings_key
from ._source import InputSource
from .graph import fixed_statistics
from .isolated import draw_indices, isolated_vu
from .measurements import FORMAT, VERSION, Measurements
from .recorder import LayerRecord, Recorder, gather_records
from .reference import ReferenceResult, reference_pass


def _check_sizes(batch_sizes: Sequence[int], n: int, fractions: Sequence[float]) -> None:
    if not batch_sizes:
        raise BnprobeError("no batch sizes given")
    for k in batch_sizes:
        if int(k) < 2:
            raise BnprobeError(f"batch size {k} is too small: BN statistics need at least 2 inputs")
        if int(k) > n:
            raise BnprobeError(f"batch size {k} is larger than the data ({n} inputs)")
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise BnprobeError(f"spatial fraction {f} must be in (0, 1]")


def _running_deviation(module: nn.Module, population: tuple) -> dict[str, float]:
    """How far a layer's running buffers are from the population statistics of its input."""
    nan = float("nan")
    keys = ("running_mean_shift", "running_mean_shift_max", "running_std_ratio", "running_std_ratio_worst")
    if module.running_mean is None or module.running_var is None:
        return dict.fromkeys(keys, nan)
    mu, var = (t.detach().double().cpu() for t in population)
    std = (var + module.eps).sqrt()
    shift = (module.running_mean.detach().double().cpu() - mu).abs() / std
    ratio = (module.running_var.detach().double().cpu() + module.eps).sqrt() / std
    worst = ratio[(ratio - 1).abs().argmax()]
    return dict(zip(keys, (float(shift.median()), float(shift.max()), float(ratio.median()), float(worst))))


#: Running buffers this far off (std ratio beyond x3 or mean shifted by 3 sigma) are unusable.
UNUSABLE_STD_RATIO = 3.0
UNUSABLE_MEAN_SHIFT = 3.0


def stale_buffer_warning(layers: pd.DataFrame, tolerance: float = 0.05) -> str | None:
    """One line when running buffers differ from the population by more than ``tolerance``.

    Buffers off by more than :data:`UNUSABLE_STD_RATIO` (std) or :data:`UNUSABLE_MEAN_SHIFT`
    sigma (mean) in some layer are called unusable: evaluation mode of such a network says
    nothing about the trained one.
    """
    if "running_mean_shift" not in layers:
        return None
    ratio = layers["running_std_ratio_worst"]
    unusable = layers[(layers["running_mean_shift_max"] > UNUSABLE_MEAN_SHIFT)
                      | (ratio > UNUSABLE_STD_RATIO) | (ratio < 1 / UNUSABLE_STD_RATIO)]
    if not unusable.empty:
        worst = unusable.loc[(unusable["running_std_ratio_worst"].apply(lambda r: max(r, 1 / r))).idxmax()]
        return (f"the running BN buffers are unusable in {len(unusable)} of {len(layers)} layers (worst "
                f"{worst['name']}: std ratio {worst['running_std_ratio_worst']:.3g}, mean shifted by up to "
                f"{worst['running_mean_shift_max']:.3g} sigma): evaluation mode normalizes by statistics "
                "far from the data; bnprobe recalibrate writes a checkpoint with population buffers")
    off = layers[(layers["running_mean_shift"] > tolerance)
                 | ((layers["running_std_ratio"] - 1).abs() > tolerance)]
    if off.empty:
        return None
    worst = off.loc[off["running_mean_shift"].idxmax()]
    return (f"the running BN buffers are more than {tolerance:.0%} off the population statistics in "
            f"{len(off)} of {len(layers)} layers (worst {worst['name']}: mean shifted by "
            f"{worst['running_mean_shift']:.3f} sigma, std ratio {worst['running_std_ratio']:.3f}); "
            "bnprobe recalibrate writes a checkpoint with population buffers")


def measure(
    model: nn.Module,
    data: Any,
    batch_sizes: Sequence[int],
    samples: int = 200,
    mode: str | MeasureMode = MeasureMode.JOINT,
    reference: str | Reference = Reference.POPULATION,
    spatial_fractions: Sequence[float] | None = None,
    layers: Sequence[str] | str | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    augment: bool | None = None,
    reference_size: int | None = None,
    augment_draws: int = 1,
    isolated_method: str | IsolatedMethod = IsolatedMethod.SUFFICIENT,
    spatial_sampling: str | SpatialSampling = SpatialSampling.INDEPENDENT,
    cache_bytes: int | None = None,
    progress: bool = False,
    source: dict[str, Any] | None = None,
    resume_dir: str | Path | None = None,
) -> Measurements:
    """Sample the BN noise V = (mu - M)/sigma and U = sigma/S of every BN layer.

    M and S^2 are the batch mean and biased variance of a layer's input, mu and sigma^2 its
    reference statistics; both square roots include the layer's eps, as BN computes them
    (``U = sqrt(sigma^2 + eps) / sqrt(S^2 + eps)``, ``V = (mu - M) / sqrt(sigma^2 + eps)``).

    Under torchrun (a process group joined, see :mod:`bnprobe.distributed`) every process
    computes the same reference pass, then draws its :func:`~bnprobe.distributed.shard_slice`
    of the ``samples`` draws of each batch size with a random stream of its own (process 0
    keeps the stream of one process); the draws are gathered in process order, and every
    process returns the same measurements. Bad input is raised on every process.

    Args:
        model: The network; it comes back exactly as it was (flags, buffers, no hooks).
        data: ``DeviceImages``, a torch Dataset (items ``(x, y)`` or ``x``) or a Tensor.
        batch_sizes: Batch sizes k to draw (each >= 2 and <= the data size).
        samples: Draws per batch size (under torchrun, split between the processes).
        mode: ``joint`` (every BN in training mode, as during learning: a layer's V and U
            include the noise its upstream layers pass on) or ``isolated`` (every other BN
            normalizes with the reference statistics: pure per-layer sampling noise).
        reference: ``population`` (the sequential population statistics: each layer's input
            over the data with every upstream BN normalizing by its own population
            statistics, float64, independent of the running buffers; see
            :func:`.reference.reference_pass`) or ``running`` (the layers' running buffers).
        spatial_fractions: Also compute M, S over random subsets of these fractions of the
            spatial positions (1.0 is always included).
        layers: Glob patterns, names or indices selecting BN layers (default: all).
        generator: CPU generator for batch draws; None uses a fresh seed-0 generator.
        device: Where to run (default: the model's device).
        augment: Augment draws as in training (default: when ``data`` is DeviceImages whose
            normalization translates or flips).
        reference_size: Inputs for the reference (a seeded random subset); None: all data.
        augment_draws: Augmented copies of each input in the reference pass and, in isolated
            mode with sufficient statistics, the copies batches are drawn from.
        isolated_method: ``sufficient`` (draw batches from per-input sums recorded in the
            reference pass, no forward passes) or ``forward`` (a forward pass per draw).
        spatial_sampling: ``independent`` (random positions per input) or ``shared`` (one
            random set of positions per batch) for spatial fractions below 1.
        cache_bytes: Memory the reference pass may keep (default: a share of what is free).
        progress: Show progress bars.
        source: Provenance to store in ``meta['source']`` (checkpoint, dataset, ...).
        resume_dir: Folder where progress is kept (reference pass, finished batch sizes,
            generator states). A call with the same arguments continues from it and gives
            the same result as an uninterrupted one; other arguments are refused, and so is
            another number of processes. Under torchrun only process 0 uses the folder.

    Returns:
        The measurements; ``meta['warnings']`` lists problems found on the way.
    """
    w = world()
    progress = progress and w.is_main
    with shared_errors():
        mode = MeasureMode.parse(mode, "mode")
        reference = Reference.parse(reference, "reference")
        isolated_method = IsolatedMethod.parse(isolated_method, "isolated method")
        spatial_sampling = SpatialSampling.parse(spatial_sampling, "spatial sampling")
        fractions = sorted({1.0, *(float(f) for f in (spatial_fractions or []))})
        batch_sizes = sorted({int(k) for k in batch_sizes})
        least = max(2, w.size)
        if samples < least:
            raise BnprobeError(f"samples must be at least {least}"
                               f"{' (one per process)' if least > 2 else ''}, got {samples}")
        if augment_draws < 1:
            raise BnprobeError(f"augment draws must be at least 1, got {augment_draws}")
        if device is None:
            p = next(iter(model.parameters()), None)
            device = p.device if p is not None else torch.device("cpu")
        device = torch.device(device)
        if augment is None:
            augment = isinstance(data, DeviceImages) and (data.norm.translate > 0 or data.norm.flip)
        src = InputSource(data, device, augment)
        _check_sizes(batch_sizes, len(src), fractions)
        bn_layers = find_bn_layers(model, layers)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    aug_gen = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    sufficient = mode is MeasureMode.ISOLATED and isolated_method is IsolatedMethod.SUFFICIENT
    draws = augment_draws if src.augment else 1
    config = {"batch_sizes": batch_sizes, "samples": samples, "mode": mode.value,
              "reference": reference.value, "spatial_fractions": fractions,
              "layers": layers if layers is None or isinstance(layers, str) else list(layers),
              "augment": bool(src.augment), "reference_size": reference_size, "augment_draws": draws,
              "isolated_method": isolated_method.value if mode is MeasureMode.ISOLATED else None,
              "spatial_sampling": spatial_sampling.value}
    partial = PartialMeasurement(resume_dir, settings_key(config, source, model, gen) if resume_dir else "")
    gens = {"gen": gen, "aug_gen": aug_gen}
    mine = shard_slice(samples, w)
    count = mine.stop - mine.start  # this process's draws of each batch size

    with preserved_state(model), torch.no_grad():
        if partial.resumed:
            partial.restore_generators(**gens)
            res = ReferenceResult.from_state(partial.reference, device)
        else:
            with shared_errors():  # the same pass on every process: the same reference
                res = reference_pass(model, src, reference, size=reference_size,
                                     sums_for=[n for n, _ in bn_layers] if sufficient else (),
                                     fractions=fractions, augment_draws=draws, generator=gen,
                                     aug_generator=aug_gen, cache_bytes=cache_bytes, progress=progress)
            for g in gens.values():  # the draws: a stream per process (process 0 keeps its own)
                rank_stream(g, w.rank)
            partial.save(gens, reference=res.to_state)
        position = {name: i for i, name in enumerate(res.order)}
        bn_layers = sorted(bn_layers, key=lambda nm: position.get(nm[0], len(position)))
        for k in batch_sizes:
            if k in partial.tables:
                continue
            if sufficient:
                records = _sufficient_records(res, bn_layers, fractions, k, count, len(src), draws, gen)
            else:
                records = _forward_records(model, src, res, bn_layers, mode, fractions, k, count, gen,
                                           aug_gen, spatial_sampling, progress)
            partial.save(gens, k=k, table=_tidy(gather_records(records), bn_layers, fractions, k, samples))
    tables = [partial.tables[k] for k in batch_sizes]
    layer_table, ref_table = _layer_tables(bn_layers, res, reference, dict(_spatial(tables)))
    warnings = [line for line in [stale_buffer_warning(layer_table)] if line]
    meta = {
        "format": FORMAT, "version": VERSION, "bnprobe_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "reference_pass": {"method": res.method, "inputs": res.inputs, "restarts": res.restarts,
                           "layers": len(res.order)},
        "warnings": warnings,
        "world_size": w.size,
        "source": source or {},
    }
    return Measurements(pd.concat(tables, ignore_index=True), layer_table, ref_table, meta)


def _forward_records(model, src, res, layers, mode, fractions, k, samples, gen, aug_gen, sampling, progress):
    """V, U by forward passes: joint (every BN in training mode) or isolated (fixed statistics)."""
    model.eval()
    fixed = contextlib.nullcontext()
    if mode is MeasureMode.JOINT:
        for _, m in find_bn_layers(model):
            m.train()
    else:
        fixed = fixed_statistics(model, res.reference)
    shared = sampling is SpatialSampling.SHARED
    with fixed, Recorder(layers, res.reference, fractions, aug_gen, shared_positions=shared) as rec:
        rec.reset(samples, src.device)
        for _ in progress_bar(range(samples), total=samples, enabled=progress, desc=f"k={k}"):
            rec.run(model, src.get(draw_indices(len(src), k, 1, gen)[0], aug_gen))
    return rec.records


def _sufficient_records(res, layers, fractions, k, samples, n, draws, gen):
    """V, U of isolated mode from the per-input sums of the reference pass."""
    index = draw_indices(n, k, samples, gen)
    copy = torch.randint(draws, index.shape, generator=gen) if draws > 1 else None
    records = {}
    for name, module in layers:
        sums = res.sums[name]
        rec = LayerRecord(0, 0, [], sums.shift.device)
        rec.spatial = sums.spatial
        for f in fractions:
            rec.v[f], rec.u[f] = isolated_vu(sums, res.reference[name], float(module.eps), f, index, copy)
        records[name] = rec
    return records


def _tidy(records: dict[str, LayerRecord], layers, fractions, k: int, draws: int) -> pd.DataFrame:
    frames = []
    for index, (name, _) in enumerate(layers):
        r = records[name]
        for f in fractions:
            v = r.v[f].cpu().numpy()
            u = r.u[f].cpu().numpy()
            c = v.shape[1]
            frames.append(pd.DataFrame({
                "layer": np.repeat(name, draws * c),
                "layer_index": np.int32(index), "channel": np.tile(np.arange(c, dtype=np.int32), draws),
                "batch_size": np.int32(k), "spatial_size": np.int32(r.spatial), "fraction": f,
                "draw": np.repeat(np.arange(draws, dtype=np.int32), c),
                "v": v.reshape(-1).astype(np.float64), "u": u.reshape(-1).astype(np.float64),
            }))
    return pd.concat(frames, ignore_index=True)


def _spatial(tables):
    for t in tables:
        for name, z in t.groupby("layer", sort=False)["spatial_size"].first().items():
            yield name, int(z)


def _layer_tables(layers, res: ReferenceResult, reference: Reference, spatial: dict):
    rows, refs = [], []
    for index, (name, m) in enumerate(layers):
        mean, var = (t.detach().cpu().numpy() for t in res.reference[name])
        row = {"name": name, "index": index, "channels": len(mean), "spatial_size": spatial.get(name, 0),
               "eps": float(m.eps), "reference": reference.value,
               "ref_mean": float(mean.mean()), "ref_var": float(var.mean())}
        row.update(_running_deviation(m, res.population[name]))
        rows.append(row)
        refs.append(pd.DataFrame({"layer": name, "channel": np.arange(len(mean)), "mean": mean, "var": var,
                                  "reference": reference.value}))
    return pd.DataFrame(rows), pd.concat(refs, ignore_index=True)
