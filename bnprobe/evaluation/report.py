"""Markdown/CSV tables of evaluated runs (the paper's Table 1)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..errors import BnprobeError
from ..io import atomic_write, atomic_write_text, read_json, refuse_overwrite
from ..layout import EVALUATION, evaluation_file
from .run import FORMAT, metrics_table


def load_evaluation(run: str | Path) -> dict:
    """The metrics.json of a run directory, its evaluation folder, or the file itself."""
    run = Path(run)
    for candidate in (evaluation_file(run), run / EVALUATION, run):
        if candidate.is_file():
            doc = read_json(candidate, "evaluation")
            if doc.get("format") != FORMAT:
                raise BnprobeError(f"{candidate} is not a bnprobe evaluation (format {doc.get('format')!r})")
            return doc
    raise BnprobeError(f"no evaluation found for {run}: run `bnprobe evaluate {run}` first")


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub Markdown table with 4 significant digits (no extra dependency)."""
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in table.iterrows():
        cells = [("—" if math.isnan(v) else f"{v:.4g}") if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(runs: Sequence[str | Path], out: str | Path, force: bool = False) -> str:
    """Write ``out`` (Markdown) and the same table as CSV beside it; return the Markdown."""
    out = Path(out)
    csv_path = out.with_suffix(".csv")
    if not force:
        refuse_overwrite(out, "pass --force to overwrite")
    docs = [load_evaluation(r) for r in runs]
    table = metrics_table(docs).dropna(axis=1, how="all")  # e.g. MC-30 when not evaluated
    table.insert(1, "run", [str(r) for r in runs])
    md = markdown_table(table)
    if table.isna().any().any():
        md += ("\n— : no such prediction (a deterministic network: Monte Carlo = the single pass), "
               "or a value that is not finite (the network's outputs overflowed).\n")
    atomic_write_text(out, "# bnprobe report\n\n" + md)
    atomic_write(csv_path, lambda p: table.to_csv(p, index=False))
    return md
