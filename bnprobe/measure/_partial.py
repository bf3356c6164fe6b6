"""Resumable progress of ``measure``: the reference statistics and each finished batch size.

The folder holds ``reference.pt`` (the reference pass: statistics and per-input sums),
``state.pt`` (settings key, generator states and the finished batch sizes) and one
``k<K>.parquet`` table per finished batch size. Restoring the
generator states makes a resumed measurement identical to an uninterrupted one. Under torchrun
``state.pt`` also holds the number of processes and each process's generator states.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn

from ..distributed import all_gather_objects, broadcast_object, shared_errors, world
from ..errors import BnprobeError
from ..io import atomic_write
from ..layout import PARTIAL_REFERENCE as REFERENCE
from ..layout import PARTIAL_STATE as STATE
from ..layout import partial_table


def settings_key(config: dict[str, Any], source: dict[str, Any] | None, model: nn.Module,
                 generator: torch.Generator) -> str:
    """A digest of everything that determines the measurement.

    The settings, the provenance, the model's parameters and buffers, and the generator's
    starting state: a resumed measurement must match all of them.
    """
    h = hashlib.sha256(json.dumps({"config": config, "source": source or {}}, sort_keys=True,
                                  default=str).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(generator.get_state().numpy().tobytes())
    return h.hexdigest()


class PartialMeasurement:
    """Progress of one measurement in ``directory`` (``None``: nothing is kept).

    Under torchrun only process 0 reads and writes the folder: it loads the progress (a
    problem with it is raised on every process) and sends it to the others; each save
    gathers every process's generator states, so a resumed run continues each process's
    stream. A run is resumed with as many processes as it was started with.

    Args:
        directory: Folder for the progress files, created on the first save.
        key: :func:`settings_key` of the measurement; a folder made with another key is refused.
    """

    def __init__(self, directory: str | Path | None, key: str) -> None:
        self.world = world()
        self.kept = directory is not None
        self.directory = Path(directory) if self.kept and self.world.is_main else None
        self.key = key
        self.reference: dict[str, Any] | None = None
        self.tables: dict[int, pd.DataFrame] = {}
        self._gens: dict[str, torch.Tensor] = {}
        if not self.kept:
            return
        loaded = None
        with shared_errors():
            if self.directory is not None and (self.directory / STATE).is_file():
                loaded = self._load()
        loaded = broadcast_object(loaded)
        if loaded is not None:
            self.reference, ranks, self.tables = loaded
            self._gens = ranks[self.world.rank]

    def _load(self) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]], dict[int, pd.DataFrame]]:
        """``(reference, generator states per process, finished tables)`` from the folder."""
        assert self.directory is not None
        try:
            state = torch.load(self.directory / STATE, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable state is one clear error
            raise BnprobeError(f"{self.directory}: unreadable progress of an interrupted measurement "
                               f"({exc}); pass --force to start over") from exc
        if state.get("key") != self.key:
            raise BnprobeError(f"{self.directory} holds an interrupted measurement with other settings; "
                               "pass --force to start over")
        size = int(state.get("world_size", 1))
        if size != self.world.size:
            how = (f"with {size} (torchrun --nproc-per-node {size})" if size > 1
                   else "in one process (without torchrun)")
            raise BnprobeError(f"{self.directory} holds a measurement interrupted with {size} "
                               f"process{'es' if size > 1 else ''}; resume it {how} or pass --force "
                               "to start over")
        try:
            reference = torch.load(self.directory / REFERENCE, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable state is one clear error
            raise BnprobeError(f"{self.directory}: unreadable reference of an interrupted measurement "
                               f"({exc}); pass --force to start over") from exc
        ranks = state.get("generator_ranks", [state["generators"]])
        tables = {int(k): pd.read_parquet(self.directory / partial_table(k)) for k in state["done"]}
        return reference, ranks, tables

    @property
    def resumed(self) -> bool:
        """Whether earlier progress was found."""
        return self.reference is not None

    def restore_generators(self, **generators: torch.Generator) -> None:
        """Set this process's generators to their saved states (no-op when nothing was saved)."""
        for name, gen in generators.items():
            if name in self._gens:
                gen.set_state(self._gens[name].to(gen.get_state().device))

    def save(self, generators: dict[str, torch.Generator],
             reference: Callable[[], dict[str, Any]] | None = None,
             k: int | None = None, table: pd.DataFrame | None = None) -> None:
        """Record the generator states with the reference pass or a finished batch size.

        Every process calls it at the same points (the generator states are gathered); only
        process 0 writes.

        Args:
            generators: This process's generators by name.
            reference: Returns the state of the reference pass (``ReferenceResult.to_state``)
                to write; called only where it is written.
            k: A finished batch size.
            table: Its draws, those of every process.
        """
        if k is not None and table is not None:
            self.tables[int(k)] = table
        if not self.kept:
            return
        states = all_gather_objects({n: g.get_state().cpu() for n, g in generators.items()})
        if self.directory is None:
            return
        if reference is not None:
            ref = reference()
            atomic_write(self.directory / REFERENCE, lambda p: torch.save(ref, p))
        if k is not None and table is not None:
            atomic_write(self.directory / partial_table(k), lambda p: table.to_parquet(p, index=False))
        state = {"key": self.key, "generators": states[0], "done": sorted(self.tables)}
        if self.world.distributed:
            state["world_size"], state["generator_ranks"] = self.world.size, states
        atomic_write(self.directory / STATE, lambda p: torch.save(state, p))
