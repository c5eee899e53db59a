"""The on-disk cache of exported graphs and engines: bounded, least recently used first out.

Layout: $XDG_CACHE_HOME/stt_fast/<kind>/<key>/ (~/.cache/stt_fast), one folder per cached entry (an
exported ONNX program of one model, or an engine with its graph); kinds "onnx" and "engines" (or a
cache_dir of the caller's, holding <key>/ folders). Each use of an entry touches its folder, and after a
new entry is written its cache folder is trimmed to the limit (1 GiB by default; STT_FAST_CACHE_LIMIT_MB
changes it, 0 turns trimming off), least recently used entries first, never the one just written.
`stt-fast cache list` shows what is there and how big, `stt-fast cache clear` removes it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .files import cache_root

log = logging.getLogger(__name__)

KINDS = ("onnx", "engines")
DEFAULT_LIMIT_MB = 1024


@dataclass(frozen=True)
class Entry:
    kind: str
    path: Path
    nbytes: int
    last_used: float  # seconds since the epoch

    @property
    def key(self) -> str:
        return self.path.name


def limit_bytes() -> int | None:
    """The cache's size limit in bytes (None: unbounded), from STT_FAST_CACHE_LIMIT_MB."""
    text = os.environ.get("STT_FAST_CACHE_LIMIT_MB", str(DEFAULT_LIMIT_MB))
    try:
        megabytes = float(text)
    except ValueError:
        raise ValueError(f"STT_FAST_CACHE_LIMIT_MB must be a number of megabytes, got {text!r}") from None
    return None if megabytes <= 0 else int(megabytes * 2**20)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def kind_folders() -> list[tuple[str, Path]]:
    """(kind, folder) of the user's cache."""
    return [(kind, cache_root(kind)) for kind in KINDS]


def entries(folders: list[tuple[str, Path]] | None = None) -> list[Entry]:
    """Every cached entry in the (kind, folder) pairs (default: the user's cache), least recently used first."""
    found = []
    for kind, base in folders if folders is not None else kind_folders():
        if base.is_dir():
            found += [Entry(kind, p, _size(p), p.stat().st_mtime) for p in base.iterdir() if p.is_dir()]
    return sorted(found, key=lambda e: e.last_used)


def touch(folder: Path) -> None:
    """Mark an entry as just used."""
    now = time.time()
    os.utime(folder, (now, now))


def trim(keep: Path, limit: int | None = None) -> list[Entry]:
    """Remove the least recently used entries of keep's cache folder until it fits the limit, never `keep`
    (the entry just written or used); return those removed."""
    limit = limit_bytes() if limit is None else limit
    if limit is None:
        return []
    cached = entries([(keep.parent.name, keep.parent)])
    total = sum(e.nbytes for e in cached)
    removed = []
    for entry in cached:
        if total <= limit:
            break
        if entry.path.resolve() == keep.resolve():
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        total -= entry.nbytes
        removed.append(entry)
    if removed:
        log.info("stt_fast cache: removed %d least recently used entries (%.0f MB) from %s to stay under %.0f MB",
                 len(removed), sum(e.nbytes for e in removed) / 2**20, keep.parent, limit / 2**20)
    return removed


def describe(folder: Path) -> str:
    """One line on where a cache folder is and how big it is."""
    cached = entries([(folder.name, folder)])
    limit = limit_bytes()
    bound = f"limit {limit / 2**20:.0f} MB" if limit else "no limit"
    return f"{folder}: {len(cached)} entries, {sum(e.nbytes for e in cached) / 2**20:.0f} MB ({bound})"


def clear(kinds: tuple[str, ...] = KINDS) -> list[Entry]:
    """Remove every entry of the given kinds from the user's cache; return them."""
    removed = [e for e in entries() if e.kind in kinds]
    for entry in removed:
        shutil.rmtree(entry.path, ignore_errors=True)
    return removed
