"""stt_fast.compile(model, backend="openvino"): the exported inference program in OpenVINO's CPU plugin.

The graph is the one the onnxruntime backend runs (stt_fast's program: BatchNorm folded, the last block
pruned...), from the same cache of exported graphs. OpenVINO compiles it with float32 inference precision
(on CPUs with bfloat16 units it would otherwise compute in bfloat16) and the latency hint. On this
project's CPU machine it ran the paper configuration about 5% faster than ONNX Runtime on the same graph
(benchmarks/results/cpu-*), so it is the first CPU choice of backend="auto" where it is installed.
"""

from __future__ import annotations

import importlib.util
import os
import threading

import numpy as np
import torch
from torch import nn

from stt_fast.inputs import clips_to_float
from stt_fast.model import STT

from .halves import ExportedHalves
from .onnx_cache import program_graph
from .onnx_export import graph_precision

CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}


def openvino_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("openvino", "onnxscript", "onnx"))


class OpenVINOModule(nn.Module):
    """clips (any dtype the reference takes) -> logits, through one compiled OpenVINO model. One infer
    request per thread: a request is not safe to share between threads."""

    def __init__(self, compiled, device: torch.device, halves=None) -> None:
        super().__init__()
        self.compiled = compiled
        self.device = device
        self.halves = halves  # the program's two halves for the timeline (halves.py), exported on first use
        self._local = threading.local()

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        return self.halves.frame_features(frames)

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.halves.classify_features(features).to(self.device)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        x = np.ascontiguousarray(clips_to_float(clips.cpu(), torch.float32).numpy())
        request.infer({0: x})
        return torch.from_numpy(request.get_output_tensor(0).data.copy()).to(self.device)


def compile_openvino(model: STT, *, device: torch.device, dtype: torch.dtype,
                     cache_dir: str | os.PathLike | None = None):
    from stt_fast.compiler import CompiledSTT

    if not openvino_available():
        raise ImportError("backend 'openvino' needs openvino, onnx and onnxscript: pip install 'stt-fast[openvino]'")
    if device.type != "cpu":
        raise ValueError(f"backend 'openvino' runs on the CPU in stt_fast, not {device}")
    precision = graph_precision(dtype, "openvino")
    if precision != "fp32":
        raise ValueError("backend 'openvino' runs the float32 graph (the CPU has no faster float16 path)")
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(program_graph(model, precision, cache_dir)), "CPU", CONFIG)

    def runner(path):
        half = core.compile_model(str(path), "CPU", CONFIG)
        return lambda x: half(x)[0]

    halves = ExportedHalves(model, precision, runner, cache_dir)
    return CompiledSTT(OpenVINOModule(compiled, device, halves), config=model.config, device=device, dtype=dtype,
                       backend="openvino")
