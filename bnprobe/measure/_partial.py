"""Resumable progress of ``measure``: the reference statistics and each finished batch size.

The folder holds ``reference.pt`` (the reference pass: statistics and per-input sums),
``state.pt`` (settings key, generator states and the finished batch sizes) and one
``k<K>.parquet`` table per finished batch size. Restoring the
generator states makes a resumed measurement identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

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

    Args:
        directory: Folder for the progress files, created on the first save.
        key: :func:`settings_key` of the measurement; a folder made with another key is refused.
    """

    def __init__(self, directory: str | Path | None, key: str) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.key = key
        self.reference: dict[str, Any] | None = None
        self.tables: dict[int, pd.DataFrame] = {}
        self._gens: dict[str, torch.Tensor] = {}
        if self.directory is not None and (self.directory / STATE).is_file():
            self._load()

    def _load(self) -> None:
        assert self.directory is not None
        try:
            state = torch.load(self.directory / STATE, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable state is one clear error
            raise BnprobeError(f"{self.directory}: unreadable progress of an interrupted measurement "
                               f"({exc}); pass --force to start over") from exc
        if state.get("key") != self.key:
            raise BnprobeError(f"{self.directory} holds an interrupted measurement with other settings; "
                               "pass --force to start over")
        try:
            self.reference = torch.load(self.directory / REFERENCE, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable state is one clear error
            raise BnprobeError(f"{self.directory}: unreadable reference of an interrupted measurement "
                               f"({exc}); pass --force to start over") from exc
        self._gens = state["generators"]
        for k in state["done"]:
            self.tables[int(k)] = pd.read_parquet(self.directory / partial_table(k))

    @property
    def resumed(self) -> bool:
        """Whether earlier progress was found."""
        return self.reference is not None

    def restore_generators(self, **generators: torch.Generator) -> None:
        """Set the generators to their saved states (no-op when nothing was saved)."""
        for name, gen in generators.items():
            if name in self._gens:
                gen.set_state(self._gens[name])

    def save(self, reference: dict[str, Any], generators: dict[str, torch.Generator],
             k: int | None = None, table: pd.DataFrame | None = None) -> None:
        """Record the reference pass (written once), generator states and a finished ``k``."""
        first = self.reference is None
        self.reference = reference
        finished = k is not None and table is not None
        if finished:
            self.tables[int(k)] = table
        if self.directory is None:
            return
        if first:
            atomic_write(self.directory / REFERENCE, lambda p: torch.save(reference, p))
        if finished:
            atomic_write(self.directory / partial_table(k), lambda p: table.to_parquet(p, index=False))
        state = {
            "key": self.key,
            "generators": {n: g.get_state() for n, g in generators.items()},
            "done": sorted(self.tables),
        }
        atomic_write(self.directory / STATE, lambda p: torch.save(state, p))
