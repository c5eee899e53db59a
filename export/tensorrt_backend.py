"""stt_fast.compile(model, backend="tensorrt"): an FP16 TensorRT engine behind the reference's call.

The engine is built once and cached under cache_dir (default ~/.cache/stt_fast/engines), keyed by
the weights' fingerprint, the config, the precision, the batch profile, the TensorRT version, the GPU
and the stt_fast version; a later compile of the same model on the same machine reuses it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from stt_fast.checkpoint import state_fingerprint
from stt_fast.inputs import clips_to_float
from stt_fast.model import STT

from .engine_runtime import EngineRunner, import_tensorrt
from .onnx_export import BatchRange, export_onnx
from .simplify import simplify_onnx
from .tensorrt import build_engine


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stt_fast" / "engines"


class EngineModule(nn.Module):
    """clips on the device (any dtype the reference takes) -> logits, through an EngineRunner."""

    def __init__(self, runner: EngineRunner) -> None:
        super().__init__()
        self.runner = runner

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        if self.runner.input_dtype == "float32":
            clips = clips_to_float(clips, torch.float32)
        return self.runner(clips)


def compile_tensorrt(model: STT, *, device: torch.device, dtype: torch.dtype, batch: str | BatchRange = "1:8:64",
                     cache_dir: str | os.PathLike | None = None, workspace_gib: float = 4.0,
                     optimization_level: int = 3, rebuild: bool = False):
    from stt_fast.compiler import CompiledSTT

    trt = import_tensorrt()
    if device.type != "cuda":
        raise ValueError(f"backend 'tensorrt' runs on CUDA devices, not {device}")
    precision = {torch.float16: "fp16", torch.float32: "fp32"}.get(dtype)
    if precision is None:
        raise ValueError(f"backend 'tensorrt' builds float16 or float32 engines, not {dtype}")
    batch = BatchRange.parse(batch) if isinstance(batch, str) else batch
    props = torch.cuda.get_device_properties(device)
    from stt_fast import __version__

    key_parts = [state_fingerprint(model), model.config.to_json(), precision, str(batch), trt.__version__,
                 props.name, f"{props.major}.{props.minor}", __version__]
    key = hashlib.sha256("|".join(key_parts).encode()).hexdigest()[:20]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    engine = folder / key / "model.engine"
    if rebuild or not engine.is_file():
        with tempfile.TemporaryDirectory(prefix="stt_fast-onnx-") as tmp:
            raw = export_onnx(model, Path(tmp) / "raw.onnx", precision=precision, batch=batch)
            onnx_file = simplify_onnx(raw, engine.with_suffix(".onnx")).path
        build_engine(onnx_file, engine, batch=batch, workspace_gib=workspace_gib,
                     optimization_level=optimization_level, timing_cache=folder / "timing.cache",
                     reference_model=model, device=device.index or 0)
    runner = EngineRunner(engine, buffers="torch", device=device.index or 0)
    return CompiledSTT(EngineModule(runner), config=model.config, device=device, dtype=dtype, backend="tensorrt",
                       graphs=None)
