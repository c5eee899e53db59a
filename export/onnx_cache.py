"""Exported graphs cached on disk, keyed by everything they depend on (weights, config, precision,
batch profile, stt_fast version, and whatever the caller adds: TensorRT version, GPU...), so that
compiling the same model again on the same machine skips the export."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from stt_fast.checkpoint import state_fingerprint
from stt_fast.model import STT

from .onnx_export import BatchRange, export_onnx
from .simplify import simplify_onnx


def cache_key(model: STT, *parts: str) -> str:
    from stt_fast import __version__

    text = "|".join([state_fingerprint(model), model.config.to_json(), __version__, *parts])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cached_onnx(model: STT, folder: Path, *, precision: str, batch: BatchRange) -> Path:
    """folder/model.onnx: the simplified graph of model (exported on first use)."""
    path = folder / "model.onnx"
    if not path.is_file():
        with tempfile.TemporaryDirectory(prefix="stt_fast-onnx-") as tmp:
            raw = export_onnx(model, Path(tmp) / "raw.onnx", precision=precision, batch=batch)
            simplify_onnx(raw, path)
    return path
