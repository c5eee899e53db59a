"""stt_fast.compile(model, backend="tensorrt"): an FP16 TensorRT engine behind the reference's call.

The engine is built once and cached under cache_dir (default ~/.cache/stt_fast/engines), keyed by
the weights' fingerprint, the config, the precision, the batch profile, the TensorRT version, the GPU
and the stt_fast version; a later compile of the same model on the same machine reuses it, once its
sidecar, hash and compatibility have been checked (anything stale is rebuilt). Timing caches sit in the
cache folder, one per TensorRT version, GPU and builder flags.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from stt_fast import cache
from stt_fast.devices import cuda_device_index
from stt_fast.files import cache_root
from stt_fast.model import STT

from .engine_runtime import (
    EngineCompatibilityError,
    EngineRunner,
    check_compatible,
    check_engine_bytes,
    import_tensorrt,
    read_sidecar,
)
from .onnx_cache import cache_key, cached_onnx
from .onnx_export import BatchRange, graph_precision
from .tensorrt import build_engine

log = logging.getLogger(__name__)


class EngineModule(nn.Module):
    """clips on the device (float or uint8, rescaled by the runner to the engine's input) -> logits."""

    def __init__(self, runner: EngineRunner) -> None:
        super().__init__()
        self.runner = runner

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.runner(clips)


def cached_engine_problem(engine: Path, *, tensorrt_version: str, gpu_name: str,
                          compute_capability: str) -> str | None:
    """Why the engine cached at `engine` cannot be reused here (missing, its sidecar missing, unreadable or
    stale, its bytes not those the sidecar hashed, or not runnable by this TensorRT and GPU), or None."""
    if not engine.is_file():
        return "no engine cached yet"
    try:
        sidecar = read_sidecar(engine)
        check_engine_bytes(engine.read_bytes(), sidecar, engine)
        check_compatible(sidecar, tensorrt_version=tensorrt_version, gpu_name=gpu_name,
                         compute_capability=compute_capability)
    except (EngineCompatibilityError, KeyError, TypeError) as e:
        return f"the cached engine is unusable ({type(e).__name__}: {e})"
    return None


def compile_tensorrt(model: STT, *, device: torch.device, dtype: torch.dtype, batch: str | BatchRange = "1:8:64",
                     cache_dir: str | os.PathLike | None = None, workspace_gib: float = 4.0,
                     optimization_level: int = 3, rebuild: bool = False):
    from stt_fast.compiler import CompiledSTT

    trt = import_tensorrt()
    if device.type != "cuda":
        raise ValueError(f"backend 'tensorrt' runs on CUDA devices, not {device}")
    index = cuda_device_index(device)
    precision = graph_precision(dtype, "tensorrt")
    batch = BatchRange.parse(batch) if isinstance(batch, str) else batch
    props = torch.cuda.get_device_properties(index)
    capability = f"{props.major}.{props.minor}"
    root = cache_root("engines", cache_dir)
    folder = root / cache_key(model, precision, str(batch), trt.__version__, props.name, capability)
    engine = folder / "model.engine"
    problem = "a rebuild was asked for" if rebuild else cached_engine_problem(
        engine, tensorrt_version=trt.__version__, gpu_name=props.name, compute_capability=capability)
    if problem is not None:
        log.info("stt_fast.compile: building a TensorRT engine in %s (%s)", folder, problem)
        onnx_file = cached_onnx(model, folder, precision=precision, batch=batch)
        build_engine(onnx_file, engine, batch=batch, workspace_gib=workspace_gib,
                     optimization_level=optimization_level, timing_cache=root,
                     reference_model=model, device=index)
        cache.trim(keep=folder)
    cache.touch(folder)
    runner = EngineRunner(engine, buffers="torch", device=index)
    return CompiledSTT(EngineModule(runner), config=model.config, device=device, dtype=dtype, backend="tensorrt")
