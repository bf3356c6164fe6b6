"""``measure``: sample V and U of every BN layer over random batches."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._version import __version__
from ..data.batches import DeviceImages
from ..errors import BnprobeError
from ..options import MeasureMode, Reference
from ..progress import progress_bar
from ._layers import find_bn_layers, preserved_state
from ._partial import PartialMeasurement, settings_key
from ._source import InputSource
from .measurements import FORMAT, VERSION, Measurements
from .recorder import Recorder
from .reference import population_statistics


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


def _reference_stats(model, layers, source, reference, cap, gen, aug_gen, progress):
    if reference is Reference.RUNNING:
        out = {}
        for name, m in layers:
            if m.running_mean is None or m.running_var is None:
                raise BnprobeError(f"layer {name} keeps no running statistics; use --reference population")
            out[name] = (m.running_mean.detach().double(), m.running_var.detach().double())
        return out
    return population_statistics(model, layers, source, cap=cap, generator=gen,
                                 aug_generator=aug_gen, progress=progress)


def _set_mode(model: nn.Module, layers, mode: MeasureMode, ref: dict) -> None:
    """Joint: every BN in training mode. Isolated: every BN normalizes with the reference."""
    model.eval()
    if mode is MeasureMode.JOINT:
        for _, m in find_bn_layers(model):
            m.train()
        return
    with torch.no_grad():
        for name, m in layers:
            if m.running_mean is not None:
                m.running_mean.copy_(ref[name][0])
                m.running_var.copy_(ref[name][1])


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
    reference_cap: int = 10000,
    progress: bool = False,
    source: dict[str, Any] | None = None,
    resume_dir: str | Path | None = None,
) -> Measurements:
    """Sample the BN noise V = (mu - M)/sigma and U = sigma/S of every BN layer.

    Args:
        model: The network; it comes back exactly as it was (flags, buffers, no hooks).
        data: ``DeviceImages``, a torch Dataset (items ``(x, y)`` or ``x``) or a Tensor.
        batch_sizes: Batch sizes k to draw (each >= 2 and <= the data size).
        samples: Draws per batch size.
        mode: ``joint`` (every BN in training mode, as during learning) or ``isolated``
            (upstream BN layers deterministic with the reference statistics).
        reference: ``population`` (exact statistics of each layer's input over the data, BN
            in evaluation mode, float64) or ``running`` (the layers' running buffers).
        spatial_fractions: Also compute M, S over random subsets of these fractions of the
            spatial positions (1.0 is always included).
        layers: Glob patterns, names or indices selecting BN layers (default: all).
        generator: CPU generator for batch draws; None uses a fresh seed-0 generator.
        device: Where to run (default: the model's device).
        augment: Augment draws as in training (default: when ``data`` is DeviceImages whose
            normalization translates or flips).
        reference_cap: At most this many inputs for the population statistics.
        progress: Show progress bars.
        source: Provenance to store in ``meta['source']`` (checkpoint, dataset, ...).
        resume_dir: Folder where progress is kept (reference statistics, finished batch
            sizes, generator states). A call with the same arguments continues from it and
            gives the same result as an uninterrupted one; other arguments are refused.

    Returns:
        The measurements.
    """
    mode = MeasureMode.parse(mode, "mode")
    reference = Reference.parse(reference, "reference")
    fractions = sorted({1.0, *(float(f) for f in (spatial_fractions or []))})
    batch_sizes = sorted({int(k) for k in batch_sizes})
    if samples < 2:
        raise BnprobeError(f"samples must be at least 2, got {samples}")
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
    config = {"batch_sizes": batch_sizes, "samples": samples, "mode": mode.value,
              "reference": reference.value, "spatial_fractions": fractions,
              "layers": layers if layers is None or isinstance(layers, str) else list(layers),
              "augment": bool(augment), "reference_cap": reference_cap}
    partial = PartialMeasurement(resume_dir, settings_key(config, source, model, gen) if resume_dir else "")
    gens = {"gen": gen, "aug_gen": aug_gen}

    with preserved_state(model), torch.no_grad():
        if partial.resumed:
            partial.restore_generators(**gens)
            ref = {n: (m.to(device), v.to(device)) for n, (m, v) in partial.reference.items()}
        else:
            ref = _reference_stats(model, bn_layers, src, reference, reference_cap, gen, aug_gen, progress)
            partial.save(ref, gens)
        _set_mode(model, bn_layers, mode, ref)
        with Recorder(bn_layers, ref, fractions, aug_gen) as rec:
            for k in batch_sizes:
                if k in partial.tables:
                    continue
                rec.reset(samples, device)
                for _ in progress_bar(range(samples), total=samples, enabled=progress, desc=f"k={k}"):
                    idx = torch.randperm(len(src), generator=gen)[:k]
                    rec.run(model, src.get(idx, aug_gen))
                partial.save(ref, gens, k, _tidy(rec, bn_layers, k, samples))
    tables = [partial.tables[k] for k in batch_sizes]
    layer_table, ref_table = _layer_tables(bn_layers, ref, rec_spatial={n: t for n, t in _spatial(tables)})
    meta = {
        "format": FORMAT, "version": VERSION, "bnprobe_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "source": source or {},
    }
    return Measurements(pd.concat(tables, ignore_index=True), layer_table, ref_table, meta)


def _tidy(rec: Recorder, layers, k: int, draws: int) -> pd.DataFrame:
    frames = []
    for index, (name, _) in enumerate(layers):
        r = rec.records[name]
        for f in rec.fractions:
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


def _layer_tables(layers, ref, rec_spatial):
    rows, refs = [], []
    for index, (name, m) in enumerate(layers):
        mean, var = (t.detach().cpu().numpy() for t in ref[name])
        rows.append({"name": name, "index": index, "channels": len(mean),
                     "spatial_size": rec_spatial.get(name, 0), "eps": float(m.eps),
                     "ref_mean": float(mean.mean()), "ref_var": float(var.mean())})
        refs.append(pd.DataFrame({"layer": name, "channel": np.arange(len(mean)), "mean": mean, "var": var}))
    return pd.DataFrame(rows), pd.concat(refs, ignore_index=True)
