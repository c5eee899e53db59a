"""File helpers: atomic writes (nothing half-written is ever left under the final name) and hashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    On any exception (KeyboardInterrupt included) the temporary file is removed and ``path`` is left
    as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files, and some writers (safetensors) recreate the file: the usual permissions,
        # set on what was written, just before it takes the final name
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_to_replace(paths, overwrite: bool) -> None:
    """FileExistsError naming the first of paths that exists, unless overwrite: nothing a user has is
    replaced without being asked (--force)."""
    existing = [Path(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --force to replace it")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def cache_root(kind: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where stt_fast caches `kind` (exported graphs, engines, the synthetic model): cache_dir when
    given, else $XDG_CACHE_HOME/stt_fast/<kind> (~/.cache/stt_fast/<kind>)."""
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stt_fast" / kind


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
