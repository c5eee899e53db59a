"""Progress bars: one helper, so every long step shows progress the same way.

Bars go to stderr (stdout stays for results: tables, JSON), and only to a terminal: piped or logged
output gets no bar. ``enabled=False`` (the commands' --quiet) turns them off everywhere.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm


def progress_bar(iterable: Iterable | None = None, *, desc: str, total: int | None = None, enabled: bool = True,
                 unit: str = "it", leave: bool = False) -> tqdm:
    """tqdm over iterable (or a manual bar of total steps) on stderr; off when not a TTY or not enabled."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr,
                disable=None if enabled else True, dynamic_ncols=True)
