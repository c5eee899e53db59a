"""stt_fast.compile(model, backend="tensorrt"): an FP16 TensorRT engine behind the reference's call.

The engine is built once and cached under cache_dir (default ~/.cache/stt_fast/engines), keyed by
the weights' fingerprint, the config, the precision, the batch profile, the TensorRT version, the GPU
and the stt_fast version; a later compile of the same model on the same machine reuses it.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from stt_fast.files import cache_root
from stt_fast.inputs import clips_to_float
from stt_fast.model import STT

from .engine_runtime import EngineRunner, import_tensorrt
from .onnx_cache import cache_key, cached_onnx
from .onnx_export import BatchRange, graph_precision
from .tensorrt import build_engine


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
    precision = graph_precision(dtype, "tensorrt")
    batch = BatchRange.parse(batch) if isinstance(batch, str) else batch
    props = torch.cuda.get_device_properties(device)
    root = cache_root("engines", cache_dir)
    folder = root / cache_key(model, precision, str(batch), trt.__version__, props.name,
                              f"{props.major}.{props.minor}")
    engine = folder / "model.engine"
    if rebuild or not engine.is_file():
        onnx_file = cached_onnx(model, folder, precision=precision, batch=batch)
        build_engine(onnx_file, engine, batch=batch, workspace_gib=workspace_gib,
                     optimization_level=optimization_level, timing_cache=root / "timing.cache",
                     reference_model=model, device=device.index or 0)
    runner = EngineRunner(engine, buffers="torch", device=device.index or 0)
    return CompiledSTT(EngineModule(runner), config=model.config, device=device, dtype=dtype, backend="tensorrt")
