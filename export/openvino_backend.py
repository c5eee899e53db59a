"""stt_fast.compile(model, backend="openvino"): the exported inference program in OpenVINO's CPU plugin.

The graph is the one the onnxruntime backend runs (stt_fast's program: BatchNorm folded, the last block
pruned...), from the same cache of exported graphs (float32). OpenVINO compiles it with the inference
precision asked for, f32 or bf16 (INFERENCE_PRECISION_HINT: OpenVINO converts the graph's operations
itself, keeping what it needs in float32), and the latency hint. Left to itself OpenVINO computes in bf16
on CPUs with bf16 units and in f32 elsewhere; stt_fast always says which (stt_fast.compiler.precision
chooses). On this project's CPU machine it ran the paper configuration about 5% faster than ONNX Runtime on
the same graph in float32 (benchmarks/results/cpu-*), so it is the first CPU choice of backend="auto".
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

HINTS = {torch.float32: "f32", torch.bfloat16: "bf16"}


def openvino_config(dtype: torch.dtype) -> dict[str, str]:
    """The CPU plugin's configuration for a compute dtype; ValueError for one it does not run here."""
    if dtype not in HINTS:
        raise ValueError(f"backend 'openvino' computes in float32 or bfloat16 on x86 CPUs, not {dtype}")
    return {"INFERENCE_PRECISION_HINT": HINTS[dtype], "PERFORMANCE_HINT": "LATENCY"}


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
    config = openvino_config(dtype)
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(program_graph(model, "fp32", cache_dir)), "CPU", config)

    def runner(path):
        half = core.compile_model(str(path), "CPU", config)
        return lambda x: half(x)[0]

    halves = ExportedHalves(model, "fp32", runner, cache_dir)
    return CompiledSTT(OpenVINOModule(compiled, device, halves), config=model.config, device=device, dtype=dtype,
                       backend="openvino")
