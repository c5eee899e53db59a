"""stt_fast.compile(model, backend="onnxruntime"): the exported inference program in ONNX Runtime.

On this project's CPU machine it runs the paper configuration faster than the PyTorch path (see
benchmarks/results), so it is the CPU default of backend="auto" when onnxruntime is installed. The
graph is the same program the other backends run (BatchNorm folded, last block pruned...), exported
once and cached under cache_dir (default ~/.cache/stt_fast/onnx).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from stt_fast.inputs import clips_to_float
from stt_fast.model import STT

from .halves import ExportedHalves
from .onnx_cache import program_graph
from .onnx_export import graph_precision
from .parity import ort_session, run_session


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


class SessionModule(nn.Module):
    """clips (any dtype the reference takes) -> logits, through one ONNX Runtime session; and, for the
    timeline, the program's two halves through two more (halves.py, exported on first use)."""

    def __init__(self, session, device: torch.device, halves=None) -> None:
        super().__init__()
        self.session = session
        self.device = device
        self.halves = halves

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        return self.halves.frame_features(frames)

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.halves.classify_features(features).to(self.device)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return run_session(self.session, clips_to_float(clips.cpu(), torch.float32)).to(self.device)


def compile_onnxruntime(model: STT, *, device: torch.device, dtype: torch.dtype,
                        cache_dir: str | os.PathLike | None = None):
    from stt_fast.compiler import CompiledSTT

    if not onnxruntime_available():
        raise ImportError("backend 'onnxruntime' needs onnxruntime and onnxscript: pip install 'stt-fast[export]'")
    if dtype == torch.bfloat16:
        raise ValueError("backend 'onnxruntime' has no bfloat16 kernels for this program's operators on its CPU "
                         "provider: use backend 'openvino' or 'torch' for bfloat16")
    precision = graph_precision(dtype, "onnxruntime")
    if device.type == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError("backend 'onnxruntime' on CUDA needs onnxruntime-gpu (no CUDAExecutionProvider here)")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    session = ort_session(program_graph(model, precision, cache_dir), providers)

    def runner(path):
        half = ort_session(path, providers)
        name = half.get_inputs()[0].name
        return lambda x: half.run(None, {name: x})[0]

    halves = ExportedHalves(model, precision, runner, cache_dir)
    return CompiledSTT(SessionModule(session, device, halves), config=model.config, device=device, dtype=dtype,
                       backend="onnxruntime")
