"""stt_fast.compile(model): the reference STT in, a much faster module computing the same logits out."""

from __future__ import annotations

import logging

import torch
from torch import nn

from stt_fast.inputs import check_clips
from stt_fast.kernels import SUPPORTED_HEAD_DIMS
from stt_fast.kernels.add_layer_norm import MAX_DIM
from stt_fast.kernels.st_attention import HAS_TRITON, interpreting
from stt_fast.model import STT

from .cuda_graphs import GraphCache
from .program import STTProgram
from .validation import ValidationError, ValidationReport
from .validation import validate as _validate

__all__ = ["BACKENDS", "CompiledSTT", "ValidationError", "ValidationReport", "compile"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch", "onnxruntime", "tensorrt")
BACKEND_OPTIONS = {"onnxruntime": {"cache_dir"},
                   "tensorrt": {"cache_dir", "batch", "workspace_gib", "optimization_level", "rebuild"}}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class CompiledSTT(nn.Module):
    """Inference module returned by stt_fast.compile: clips [B, T, 3, H, W] -> logits [B, K] float32.

    Same call signature and input checks as the reference STT. Inputs may live on any device; uint8
    clips travel to the device as uint8 and are scaled there. Logits are returned on ``device``.
    Attributes: config, device, dtype, backend, validation (the ValidationReport, or None).
    """

    def __init__(self, program: nn.Module, *, config, device: torch.device, dtype: torch.dtype, backend: str,
                 graphs: GraphCache | None) -> None:
        super().__init__()
        self.program = program
        self.config = config
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.graphs = graphs
        self.validation: ValidationReport | None = None

    def train(self, mode: bool = True) -> CompiledSTT:
        if mode:
            raise ValueError("a compiled STT is inference-only; train the reference model and compile it again")
        return super().train(False)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        check_clips(clips, self.config)
        clips = clips.to(self.device, non_blocking=True)
        with torch.no_grad():
            if self.graphs is not None:
                return self.graphs(clips)
            return self.program(clips)

    def extra_repr(self) -> str:
        return f"backend={self.backend}, device={self.device}, dtype={self.dtype}, graphs={self.graphs is not None}"


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def _resolve_backend(backend: str, model: STT, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    c = model.config
    triton_problem = None
    if not HAS_TRITON:
        triton_problem = "the 'triton' package is not installed"
    elif device.type != "cuda" and not interpreting():
        triton_problem = f"Triton kernels run on CUDA devices (or with TRITON_INTERPRET=1), not {device}"
    elif c.head_dim not in SUPPORTED_HEAD_DIMS:
        triton_problem = f"head dim {c.head_dim} is not one of the kernel's {SUPPORTED_HEAD_DIMS}"
    elif c.embed_dim > MAX_DIM:
        triton_problem = f"embed_dim {c.embed_dim} is above the LayerNorm kernel's limit of {MAX_DIM}"
    if backend == "auto":
        if device.type == "cuda" and triton_problem is None:
            return "triton"
        if device.type == "cuda":
            log.warning("stt_fast.compile: using the 'torch' backend because %s", triton_problem)
            return "torch"
        from stt_fast.export.onnxruntime_backend import onnxruntime_available

        # On the CPU, ONNX Runtime running the exported program was measured faster than the PyTorch
        # path (benchmarks/results/cpu-*): it is the default where it is installed.
        return "onnxruntime" if onnxruntime_available() else "torch"
    if backend == "triton" and triton_problem is not None:
        raise ValueError(f"backend 'triton' cannot run this model: {triton_problem}")
    return backend


def compile(model: STT, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
            backend: str = "auto", cuda_graphs: bool = True, validate: bool = True, channels_last: bool = True,
            max_graphs: int = 8, **backend_options) -> nn.Module:
    """Return a module computing ``model``'s logits much faster, checked against it when ``validate``.

    model: a reference ``stt_fast.STT`` in eval mode (any config, with its weights); it is not modified.
    device: where the compiled module runs; defaults to the model's device.
    dtype: compute precision; float16 by default on CUDA, float32 on the CPU; bfloat16 available.
    backend: "auto" ("triton" on CUDA; on the CPU "onnxruntime" where installed, else "torch");
        "triton" (fused Triton attention and add+LayerNorm kernels); "torch" (PyTorch only: SDPA over
        regrouped tokens, folded BatchNorm, channels_last); "onnxruntime" (the same program exported
        to ONNX, cached on disk, run by ONNX Runtime); "tensorrt" (an FP16 TensorRT engine, built or
        reused from a cache; see stt_fast.export).
    cuda_graphs: on CUDA, capture one graph per input shape (at most ``max_graphs``, least recently
        used evicted) so that small batches are not launch-bound.
    validate: run the reference and the compiled module side by side on probe clips and raise
        ValidationError, with the measured error, when the logits differ beyond the precision's
        tolerance (stt_fast.accuracy.TOLERANCES); the report is kept as ``.validation``.
    channels_last: run the backbone's convolutions on channels_last activations.
    backend_options: options of the "onnxruntime" and "tensorrt" backends (cache_dir; for tensorrt also
        batch, workspace_gib, optimization_level, rebuild: see stt_fast.export.tensorrt_backend).

    Every backend applies the same rewrites (stt_fast.compiler.program): BatchNorm folding, packed
    qkv, proj and temporal_fc folded, fused residual + LayerNorm, last block pruned to the cls row.
    """
    if not isinstance(model, STT):
        raise ValueError(f"stt_fast.compile expects an stt_fast.STT, got {type(model).__name__}")
    if model.training:
        raise ValueError("the model is in training mode; call model.eval() before stt_fast.compile(model)")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = _resolve_dtype(dtype, device)
    backend = _resolve_backend(backend, model, device)

    unknown = sorted(set(backend_options) - BACKEND_OPTIONS.get(backend, set()))
    if unknown:
        raise ValueError(f"unknown options for backend {backend!r}: {unknown}")
    if backend == "tensorrt":
        from stt_fast.export.tensorrt_backend import compile_tensorrt

        compiled = compile_tensorrt(model, device=device, dtype=dtype, **backend_options)
    elif backend == "onnxruntime":
        from stt_fast.export.onnxruntime_backend import compile_onnxruntime

        compiled = compile_onnxruntime(model, device=device, dtype=dtype, **backend_options)
    else:
        program = STTProgram(model, ops=backend, channels_last=channels_last).to(device, dtype).eval()
        graphs = GraphCache(program, device, max_graphs) if cuda_graphs and device.type == "cuda" else None
        compiled = CompiledSTT(program, config=model.config, device=device, dtype=dtype, backend=backend,
                               graphs=graphs)
    if validate:
        compiled.validation = _validate(model, compiled, dtype)
    return compiled.eval()
