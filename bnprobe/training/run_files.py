"""Writing the per-epoch metrics.csv of a run directory (file names: :mod:`bnprobe.layout`)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..io import atomic_write_text


def write_metrics_csv(path: str | Path, history: list[dict[str, Any]]) -> None:
    """Write the per-epoch history as CSV, atomically (rewritten whole each epoch)."""
    if not history:
        return
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _fmt(row.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value
