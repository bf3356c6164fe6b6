"""Recording V and U of BN layers over random batches with forward pre-hooks."""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from ..distributed import all_gather_objects, world
from ..layers import channel_moments, hooks_removed, spatial_size
from .graph import StopForward


class LayerRecord:
    """Preallocated V, U buffers of one layer for one batch size.

    Attributes:
        v: Per fraction, a (draws, C) tensor of V.
        u: Per fraction, a (draws, C) tensor of U.
        spatial: Spatial positions of the layer's input.
    """

    def __init__(self, draws: int, channels: int, fractions: Sequence[float], device: torch.device) -> None:
        self.v = {f: torch.empty(draws, channels, device=device, dtype=torch.float64) for f in fractions}
        self.u = {f: torch.empty(draws, channels, device=device, dtype=torch.float64) for f in fractions}
        self.spatial = 0


def gather_records(records: dict[str, LayerRecord]) -> dict[str, LayerRecord]:
    """Every torchrun process's draws, concatenated in process order (alone: ``records``).

    Every process calls it with records of the same layers and fractions; the result is on
    each process's device.
    """
    if not world().distributed:
        return records
    mine = {name: (r.spatial, {f: (r.v[f].cpu(), r.u[f].cpu()) for f in r.v}) for name, r in records.items()}
    parts = all_gather_objects(mine)
    out = {}
    for name, r in records.items():
        device = next(iter(r.v.values())).device
        rec = LayerRecord(0, 0, [], device)
        rec.spatial = parts[0][name][0]
        for f in r.v:
            rec.v[f] = torch.cat([part[name][1][f][0] for part in parts]).to(device)
            rec.u[f] = torch.cat([part[name][1][f][1] for part in parts]).to(device)
        out[name] = rec
    return out


def _batch_stats(x: torch.Tensor, fraction: float, generator: torch.Generator | None,
                 shared: bool = False):
    """Biased mean/variance over batch and (a random fraction of) spatial positions.

    A fraction below 1 keeps ``round(fraction z)`` positions drawn independently for each
    input (the i.i.d. subsample that the n = k z model describes), or with ``shared`` one
    set of positions for the whole batch.
    """
    if fraction < 1.0 and x.dim() > 2:
        flat = x.flatten(2)
        b, c, z = flat.shape
        keep = max(1, int(round(fraction * z)))
        if shared:
            part = flat[:, :, torch.randperm(z, device=x.device, generator=generator)[:keep]]
        else:
            pick = torch.rand(b, z, device=x.device, generator=generator).argsort(dim=1)[:, :keep]
            part = flat.gather(2, pick.unsqueeze(1).expand(-1, c, -1))
        var, mean = channel_moments(part)
    else:
        var, mean = channel_moments(x)
    return mean, var


class Recorder:
    """Attach pre-hooks that compute V, U of each layer's input for the current draw.

    Args:
        layers: ``(name, module)`` of the BN layers to record.
        reference: name -> (mu, sigma^2) of each layer's input.
        fractions: Spatial fractions to record (1.0 = all positions).
        generator: Device generator for the random spatial subsets.
        shared_positions: One random set of positions per batch instead of per input.
    """

    def __init__(
        self,
        layers: Sequence[tuple[str, nn.Module]],
        reference: dict[str, tuple[torch.Tensor, torch.Tensor]],
        fractions: Sequence[float],
        generator: torch.Generator | None = None,
        shared_positions: bool = False,
    ) -> None:
        self.layers = list(layers)
        self.shared = shared_positions
        self.fractions = list(fractions)
        self.generator = generator
        self.records: dict[str, LayerRecord] = {}
        self.draw = 0
        self._handles: list = []
        self._ref = {}
        for name, module in self.layers:
            mu, var = reference[name]
            std = (var + module.eps).sqrt()
            self._ref[name] = (mu, std, float(module.eps))

    def reset(self, draws: int, device: torch.device) -> None:
        """Prepare buffers for ``draws`` draws (channel counts are known from the modules)."""
        self.records = {}
        for name, _module in self.layers:
            channels = self._ref[name][0].numel()
            self.records[name] = LayerRecord(draws, channels, self.fractions, device)
        self.draw = 0

    def _hook(self, name: str, last: bool):
        mu, std, eps = self._ref[name]

        def fn(_m: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach()
            rec = self.records[name]
            rec.spatial = spatial_size(x)
            for f in self.fractions:
                mean, var = _batch_stats(x, f, self.generator, self.shared)
                rec.v[f][self.draw] = (mu - mean.double()).div(std).to(rec.v[f].dtype)
                rec.u[f][self.draw] = std.div((var.double() + eps).sqrt()).to(rec.u[f].dtype)
            if last:
                raise StopForward

        return fn

    def __enter__(self) -> Recorder:
        last = self.layers[-1][0]
        for name, module in self.layers:
            self._handles.append(module.register_forward_pre_hook(self._hook(name, name == last)))
        return self

    def __exit__(self, *exc) -> None:
        with hooks_removed(self._handles):
            pass

    def run(self, model: nn.Module, x: torch.Tensor) -> None:
        """One forward pass (stopped after the last recorded layer), recording draw ``draw``."""
        with contextlib.suppress(StopForward):
            model(x)
        self.draw += 1
