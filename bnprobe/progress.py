"""Progress bars that switch themselves off when output is not a terminal."""

from __future__ import annotations

import sys
from typing import Any, Iterable


def progress_bar(iterable: Iterable, total: int | None = None, enabled: bool = True,
                 desc: str = "", **kwargs: Any) -> Iterable:
    """Wrap ``iterable`` in a tqdm bar if ``enabled`` and stdout is a TTY, else return it."""
    if not enabled or not sys.stdout.isatty():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, **kwargs)
