"""Exported graphs cached on disk, keyed by everything they depend on (weights, config, precision,
batch profile, stt_fast version, and whatever the caller adds: TensorRT version, GPU...), so that
compiling the same model again on the same machine skips the export."""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

from stt_fast import cache
from stt_fast.checkpoint import state_fingerprint
from stt_fast.files import cache_root
from stt_fast.model import STT

from .onnx_export import BatchRange, export_onnx
from .simplify import simplify_onnx

log = logging.getLogger(__name__)


def cache_key(model: STT, *parts: str) -> str:
    from stt_fast import __version__

    text = "|".join([state_fingerprint(model), model.config.to_json(), __version__, *parts])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cached_onnx(model: STT, folder: Path, *, precision: str, batch: BatchRange) -> Path:
    """folder/model.onnx: the simplified graph of model (exported on first use)."""
    path = folder / "model.onnx"
    if not path.is_file():
        log.info("stt_fast.compile: exporting the program to ONNX (the first compile of these weights, about 15 s "
                 "for the paper model on two CPU cores); cached in %s", folder)
        with tempfile.TemporaryDirectory(prefix="stt_fast-onnx-") as tmp:
            raw = export_onnx(model, Path(tmp) / "raw.onnx", precision=precision, batch=batch)
            simplify_onnx(raw, path)
        cache.trim(keep=folder)
        log.info("stt_fast.compile: cache %s ('stt-fast cache list' shows it)", cache.describe(folder.parent))
    else:
        log.info("stt_fast.compile: reusing the exported program cached in %s", folder)
    cache.touch(folder)
    return path


def program_graph(model: STT, precision: str, cache_dir=None) -> Path:
    """The simplified ONNX graph of model's program at precision, from the cache of exported graphs (the
    CPU runtimes' shared cache: cache_dir, default ~/.cache/stt_fast/onnx)."""
    batch = BatchRange(1, 8, 64)
    return cached_onnx(model, cache_root("onnx", cache_dir) / cache_key(model, precision, str(batch)),
                       precision=precision, batch=batch)
