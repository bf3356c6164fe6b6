"""The sequential population reference of every BN layer, and per-input sufficient statistics.

For each BN layer in execution order, the mean and (biased) variance of its input over the
data, while every upstream BN normalizes by *its own* population statistics: PreciseBN done
layer by layer (Wu & Johnson 2021, "Rethinking Batch in BatchNorm"), so the result does not
depend on the running buffers at all. With ``reference=running`` the upstream layers use their
running buffers instead, and each layer's reference is its own buffers.

The network runs segment by segment (see :mod:`.graph`): the values a later segment needs are
kept per chunk of inputs while they fit in ``cache_bytes``; otherwise the pass restarts from
the last kept point (at worst from the input). With the cache, each node runs once per input:
the reference costs about one forward pass.

The same pass can record, per input and channel, the sums of ``x - c`` and ``(x - c)^2``
(float64, ``c`` a per-channel shift) of chosen layers: with upstream deterministic a batch's
M and S^2 are functions of them, which is how isolated mode draws batches without forward
passes (:mod:`.isolated`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .. import distributed
from ..errors import BnprobeError
from ..layers import channel_moments
from ..options import Reference
from ..progress import progress_bar
from ._source import InputSource
from .graph import Stats, segmented


class _Moments:
    """Running per-channel mean and M2 (Chan et al. parallel update) in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        # Per-chunk moments in the input's dtype (two passes, see channel_moments), combined
        # across chunks in float64.
        n = x.numel() // x.shape[1]
        var, mean = channel_moments(x.detach())
        var, mean = var.to(torch.float64), mean.to(torch.float64)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, var * n
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta.square() * (self.count * n / total)
        self.count = total

    def merge(self, count: int, mean: torch.Tensor | None, m2: torch.Tensor | None) -> None:
        """Add another accumulator's ``(count, mean, m2)`` (Chan et al.)."""
        if not count:
            return
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total

    def over_processes(self) -> _Moments:
        """The moments of every process's inputs together, merged in rank order.

        Without torchrun: ``self``.
        """
        if not distributed.world().distributed:
            return self
        mine = (self.count, None if self.mean is None else self.mean.cpu(),
                None if self.m2 is None else self.m2.cpu())
        device = self.mean.device if self.mean is not None else torch.device("cpu")
        out = _Moments()
        for count, mean, m2 in distributed.all_gather_objects(mine):
            out.merge(count, None if mean is None else mean.to(device), None if m2 is None else m2.to(device))
        return out

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / self.count


@dataclass
class LayerSums:
    """Per-input sufficient statistics of one layer's input.

    Attributes:
        shift: Per-channel shift ``c`` (float64, (C,)).
        spatial: Spatial positions per input ``z``.
        sums: fraction -> ``(s1, s2)``, each (A, N, C) float64: sums of ``x - c`` and
            ``(x - c)^2`` over the input's positions (for a fraction below 1, over a random
            subset of ``round(fraction z)`` positions drawn independently per input and
            augmentation draw).
    """

    shift: torch.Tensor
    spatial: int
    sums: dict[float, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def positions(self, fraction: float) -> int:
        """Positions per input that the sums of ``fraction`` cover."""
        return max(1, int(round(fraction * self.spatial)))


@dataclass
class ReferenceResult:
    """What the reference pass computed.

    Attributes:
        reference: layer -> (mean, var) that V and U are measured against and that the layer
            normalizes by in isolated mode (population statistics, or the running buffers).
        population: layer -> (mean, var) of the layer's input over the data (float64).
        sums: layer -> :class:`LayerSums` for the layers asked for.
        order: BN layer names in execution order.
        method: ``fx-segments`` or ``hook-passes``.
        inputs: Inputs per pass (reference size times augmentation draws).
        restarts: Segments that restarted from an earlier point because the cache was full.
    """

    reference: Stats
    population: Stats
    sums: dict[str, LayerSums]
    order: list[str]
    method: str
    inputs: int
    restarts: int = 0

    def to_state(self) -> dict:
        """Plain types and CPU tensors, loadable with ``torch.load(weights_only=True)``."""
        def cpu(stats: Stats) -> dict:
            return {n: (m.detach().cpu(), v.detach().cpu()) for n, (m, v) in stats.items()}

        return {"reference": cpu(self.reference), "population": cpu(self.population),
                "sums": {n: {"shift": s.shift.cpu(), "spatial": s.spatial,
                             "sums": {f: (a.cpu(), b.cpu()) for f, (a, b) in s.sums.items()}}
                         for n, s in self.sums.items()},
                "order": self.order, "method": self.method, "inputs": self.inputs,
                "restarts": self.restarts}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> ReferenceResult:
        """Inverse of :meth:`to_state`, tensors moved to ``device``."""
        def dev(stats: dict) -> Stats:
            return {n: (m.to(device), v.to(device)) for n, (m, v) in stats.items()}

        sums = {n: LayerSums(s["shift"].to(device), int(s["spatial"]),
                             {float(f): (a.to(device), b.to(device)) for f, (a, b) in s["sums"].items()})
                for n, s in state["sums"].items()}
        return cls(dev(state["reference"]), dev(state["population"]), sums, list(state["order"]),
                   state["method"], int(state["inputs"]), int(state["restarts"]))


def default_cache_bytes(device: torch.device) -> int:
    """Half the free memory of a CUDA device, a third of the free RAM on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 3)
    except (ValueError, OSError, AttributeError):
        return 2 << 30


def _nbytes(state: object) -> int:
    """Bytes of the distinct tensors held by a segment state."""
    seen, total = set(), 0

    def visit(v: object) -> None:
        nonlocal total
        if torch.is_tensor(v):
            key = (v.untyped_storage().data_ptr(), v.device)
            if key not in seen:
                seen.add(key)
                total += v.untyped_storage().nbytes()
        elif isinstance(v, dict):
            for item in v.values():
                visit(item)
        elif isinstance(v, (list, tuple)):
            for item in v:
                visit(item)

    visit(state)
    return total


def _channel_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, positions) view of a BN input."""
    return x.flatten(2) if x.dim() > 2 else x.unsqueeze(2)


def _running(name: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if module.running_mean is None or module.running_var is None:
        raise BnprobeError(f"layer {name} keeps no running statistics; use --reference population")
    return module.running_mean.detach().double(), module.running_var.detach().double()


class _SumRecorder:
    """Collects :class:`LayerSums` of one layer chunk by chunk."""

    def __init__(self, fractions: Sequence[float], generator: torch.Generator) -> None:
        self.fractions = list(fractions)
        self.generator = generator
        self.shift: torch.Tensor | None = None
        self.spatial = 0
        self.parts: dict[float, list[tuple[torch.Tensor, torch.Tensor]]] = {f: [] for f in self.fractions}

    def update(self, x: torch.Tensor) -> None:
        rows = _channel_rows(x.detach())
        if self.shift is None:
            self.shift = rows.double().mean((0, 2))
            self.spatial = rows.shape[2]
        d = rows.double() - self.shift.view(1, -1, 1)
        b, c, z = d.shape
        for f in self.fractions:
            keep = max(1, int(round(f * z)))
            part = d
            if keep < z:
                scores = torch.rand(b, z, device=d.device, generator=self.generator)
                pick = scores.argsort(dim=1)[:, :keep]
                part = d.gather(2, pick.unsqueeze(1).expand(-1, c, -1))
            self.parts[f].append((part.sum(2), part.square().sum(2)))

    def result(self, draws: int) -> LayerSums:
        out = LayerSums(self.shift, self.spatial)
        for f, parts in self.parts.items():
            s1 = torch.cat([p[0] for p in parts]).view(draws, -1, self.shift.numel())
            s2 = torch.cat([p[1] for p in parts]).view(draws, -1, self.shift.numel())
            out.sums[f] = (s1, s2)
        return out


@torch.no_grad()
def reference_pass(
    model: nn.Module,
    source: InputSource,
    reference: str | Reference = Reference.POPULATION,
    size: int | None = None,
    sums_for: Sequence[str] = (),
    fractions: Sequence[float] = (1.0,),
    augment_draws: int = 1,
    batch_size: int = 500,
    generator: torch.Generator | None = None,
    aug_generator: torch.Generator | None = None,
    cache_bytes: int | None = None,
    progress: bool = False,
    shard: bool = False,
) -> ReferenceResult:
    """Reference statistics of every BN layer (and per-input sums of some), in one pass.

    The model is put in evaluation mode; the caller restores its state (see
    ``preserved_state``). No buffer is read (population) or written.

    Args:
        model: The network.
        source: The inputs (augmented when the source augments).
        reference: ``population`` (sequential population statistics) or ``running``.
        size: Use this many inputs (a seeded random subset); None uses all of them.
        sums_for: Layers whose per-input sufficient statistics to record.
        fractions: Spatial fractions of those sums.
        augment_draws: Augmented copies of each input (1 without augmentation).
        batch_size: Inputs per chunk.
        generator: CPU generator for the subset and the random positions.
        aug_generator: Device generator for augmentation.
        cache_bytes: Memory for kept intermediate values (default: see ``default_cache_bytes``).
        progress: Show a progress bar.
        shard: Under torchrun, each process passes its share of the inputs and the layer
            moments are merged over processes before the next layer (every process ends with
            the same statistics); augmentation draws are then independent per process.
            Without per-input sums only (``sums_for`` empty).

    Returns:
        The :class:`ReferenceResult`.
    """
    reference = Reference.parse(reference, "reference")
    shard = shard and distributed.world().distributed
    if shard and sums_for:
        raise ValueError("reference_pass: shard=True records no per-input sums")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    n_all = len(source)
    if size is not None and size < 1:
        raise BnprobeError(f"reference size must be at least 1, got {size}")
    n = n_all if size is None or size >= n_all else int(size)
    index = torch.randperm(n_all, generator=gen)[:n] if n < n_all else torch.arange(n_all)
    draws = max(1, int(augment_draws)) if source.augment else 1
    items = index.repeat(draws)
    total = len(items)
    if shard:  # this process's share of the inputs; its augmentation stream is its own
        items = items[distributed.shard_slice(len(items))]
        if aug_generator is not None:
            distributed.rank_stream(aug_generator)
    chunks = [items[s : s + batch_size] for s in range(0, len(items), batch_size)]
    device = source.device
    sub_gen = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    aug_start = aug_generator.get_state() if aug_generator is not None else None
    budget = default_cache_bytes(device) if cache_bytes is None else int(cache_bytes)

    model.eval()
    probe = torch.Generator(device=device).manual_seed(0)
    net = segmented(model, source.get(index[: min(2, n)], probe))
    modules = dict(model.named_modules())

    def inputs(i: int) -> torch.Tensor:
        if i == 0 and aug_generator is not None:
            aug_generator.set_state(aug_start)
        return source.get(chunks[i], aug_generator)

    states: list | None = None
    ref: Stats = {}
    pop: Stats = {}
    sums: dict[str, LayerSums] = {}
    restarts = 0
    held = -1  # position in net.order of the layer whose frontier ``states`` holds (-1: input)
    wanted = set(sums_for)
    for pos, layer in enumerate(progress_bar(net.order, total=len(net.order), enabled=progress,
                                             desc="reference")):
        acc = _Moments()
        rec = _SumRecorder(fractions, sub_gen) if layer in wanted else None
        kept: list | None = []
        used = 0
        restarts += int(held != pos - 1)
        for i in range(len(chunks)):
            state = states[i] if states is not None else net.start(inputs(i))
            x, after = net.advance(state, layer, ref)
            acc.update(x)
            if rec is not None:
                rec.update(x)
            if kept is not None:
                used += _nbytes(after)
                if used > budget:
                    kept = None
                else:
                    kept.append(after)
        if kept is not None:
            states, held = kept, pos
        if shard:
            acc = acc.over_processes()
        pop[layer] = (acc.mean, acc.var)
        ref[layer] = pop[layer] if reference is Reference.POPULATION else _running(layer, modules[layer])
        if rec is not None:
            sums[layer] = rec.result(draws)
    return ReferenceResult(ref, pop, sums, list(net.order), net.method, total, restarts)
