"""stt_fast.compile(model): the reference STT in, a much faster module computing the same logits out."""

from __future__ import annotations

import logging

import torch
from torch import nn

from stt_fast.inputs import check_clips, nan_rows_where_nonfinite
from stt_fast.kernels import SUPPORTED_HEAD_DIMS
from stt_fast.kernels.add_layer_norm import MAX_DIM
from stt_fast.kernels.st_attention import HAS_TRITON, interpreting
from stt_fast.model import STT

from .cuda_graphs import CudaGraphCapture, GraphCache
from .precision import default_precisions, exact_float32, runs
from .program import STTProgram
from .validation import ValidationError, ValidationReport, probe_clips
from .validation import validate as _validate

__all__ = ["BACKENDS", "CompiledSTT", "ValidationError", "ValidationReport", "compile"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch", "onnxruntime", "openvino", "tensorrt")
BACKEND_OPTIONS = {"onnxruntime": {"cache_dir"}, "openvino": {"cache_dir"},
                   "tensorrt": {"cache_dir", "batch", "workspace_gib", "optimization_level", "rebuild"}}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class CompiledSTT(nn.Module):
    """Inference module returned by stt_fast.compile: clips [B, T, 3, H, W] -> logits [B, K] float32.

    Same call signature and input checks as the reference STT. Inputs may live on any device; uint8
    clips travel to the device as uint8 and are scaled there. Logits are returned on ``device``.
    Values are checked without a device sync (stt_fast.inputs): clips from the CPU are checked there and
    refused with ValueError; float clips already on a GPU are not read back, and a clip holding NaN or
    infinity gets a row of NaN logits instead.
    Attributes: config, device, dtype, backend, validation (the ValidationReport, or None),
    fallback_reason (why the first backend or precision tried was not kept, or None), dtype_reason (why
    this precision), graphs (the CUDA graph cache, or None).
    """

    def __init__(self, program: nn.Module, *, config, device: torch.device, dtype: torch.dtype, backend: str,
                 cuda_graphs: bool = False, max_graphs: int = 8) -> None:
        super().__init__()
        self.program = program
        self.config = config
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.graphs = GraphCache(CudaGraphCapture(self._infer, device), max_graphs) if cuda_graphs else None
        self.validation: ValidationReport | None = None
        self.fallback_reason: str | None = None
        self.dtype_reason: str = ""

    def train(self, mode: bool = True) -> CompiledSTT:
        if mode:
            raise ValueError("a compiled STT is inference-only; train the reference model and compile it again")
        return super().train(False)

    def _infer(self, clips: torch.Tensor) -> torch.Tensor:
        """clips on the device -> logits; what a CUDA graph captures."""
        logits = self.program(clips)
        if self.device.type != "cpu":  # values on the device are never read on the host
            logits = nan_rows_where_nonfinite(logits, clips)
        return logits

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        check_clips(clips, self.config, values_on_device=False)
        with torch.no_grad(), exact_float32(self.device, self.dtype):  # no TF32 in a float32 program
            if self.graphs is not None:  # the graph's replay copies the clips to the device itself, once
                return self.graphs(clips)
            return self._infer(clips.to(self.device, non_blocking=True))

    def warm_up(self, batch_sizes) -> None:
        """Run one call at each of batch_sizes (uint8 zeros): kernels compile and autotune, and CUDA graphs are
        captured for their buckets, before the first real request rather than under its lock."""
        c = self.config
        for batch in sorted(set(batch_sizes)):
            self(torch.zeros(batch, c.num_frames, 3, c.image_size, c.image_size, dtype=torch.uint8))

    @property
    def has_halves(self) -> bool:
        """Whether frame_features / classify_features run here (every backend of stt_fast.compile has them)."""
        return hasattr(self.program, "frame_features")

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """The per-frame half (STTProgram.frame_features): frames [F, 3, H, W] uint8 or float in [0, 1]
        -> features [F, N, C] on the device. Without CUDA graphs: the timeline calls it on a few frames."""
        if not self.has_halves:
            raise NotImplementedError(f"the {self.backend!r} backend runs the whole model only")
        with torch.no_grad(), exact_float32(self.device, self.dtype):
            return self.program.frame_features(frames.to(self.device, non_blocking=True))

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """The per-clip half: features [B, T*N, C] (from frame_features) -> logits [B, K] float32."""
        if not self.has_halves:
            raise NotImplementedError(f"the {self.backend!r} backend runs the whole model only")
        with torch.no_grad(), exact_float32(self.device, self.dtype):
            return self.program.classify_features(features.to(self.device))

    def extra_repr(self) -> str:
        return (f"backend={self.backend}, device={self.device}, dtype={self.dtype}, "
                f"graphs={self.graphs is not None}")


def _resolve_dtype(dtype) -> torch.dtype | None:
    """The dtype asked for, or None for the automatic choice (dtype None or "auto": precision.py)."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


# Triton emits no tensor-core instruction below sm_80 (measured with ahead-of-time compiles for sm_75:
# FMA only, with spills; see `stt-fast kernels aot`): there the torch path (cuDNN, SDPA) serves.
TRITON_MIN_CAPABILITY = (8, 0)


def triton_problem(model: STT, device: torch.device) -> str | None:
    """Why the Triton backend cannot run model on device, or None when it can."""
    c = model.config
    if not HAS_TRITON:
        return "the 'triton' package is not installed"
    if device.type != "cuda" and not interpreting():
        return f"Triton kernels run on CUDA devices (or with TRITON_INTERPRET=1), not {device}"
    if c.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head dim {c.head_dim} is not one of the kernel's {SUPPORTED_HEAD_DIMS}"
    if c.embed_dim > MAX_DIM:
        return f"embed_dim {c.embed_dim} is above the LayerNorm kernel's limit of {MAX_DIM}"
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < TRITON_MIN_CAPABILITY:
            return (f"this GPU is sm_{capability[0]}{capability[1]}: Triton has no tensor-core path below "
                    f"sm_{TRITON_MIN_CAPABILITY[0]}{TRITON_MIN_CAPABILITY[1]}")
    return None


def auto_candidates(model: STT, device: torch.device, dtype: torch.dtype = torch.float32) -> list[str]:
    """The backends backend="auto" tries on device for dtype, best first; each next one is the fallback."""
    if device.type == "cuda":
        problem = triton_problem(model, device)
        if problem is None:
            return ["triton", "torch"]
        _warn_once(f"stt_fast.compile: using the 'torch' backend because {problem}")
        return ["torch"]
    from stt_fast.export.onnxruntime_backend import onnxruntime_available
    from stt_fast.export.openvino_backend import openvino_available

    # On the CPU, OpenVINO and ONNX Runtime running the exported program were measured faster than the
    # PyTorch path, OpenVINO the faster of the two (benchmarks/results/cpu-*): the first installed wins.
    available = {"openvino": openvino_available(), "onnxruntime": onnxruntime_available(), "torch": True}
    return [name for name, ok in available.items() if ok and runs(name, dtype)]


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _build(model: STT, backend: str, device: torch.device, dtype: torch.dtype, *, cuda_graphs: bool,
           channels_last: bool, max_graphs: int, backend_options: dict) -> CompiledSTT:
    if backend == "tensorrt":
        from stt_fast.export.tensorrt_backend import compile_tensorrt

        return compile_tensorrt(model, device=device, dtype=dtype, **backend_options)
    if backend == "onnxruntime":
        from stt_fast.export.onnxruntime_backend import compile_onnxruntime

        return compile_onnxruntime(model, device=device, dtype=dtype, **backend_options)
    if backend == "openvino":
        from stt_fast.export.openvino_backend import compile_openvino

        return compile_openvino(model, device=device, dtype=dtype, **backend_options)
    log.info("stt_fast.compile: rewriting the model for the %r backend (%s, %s)", backend, device, dtype)
    program = STTProgram(model, ops=backend, channels_last=channels_last).to(device, dtype).eval()
    return CompiledSTT(program, config=model.config, device=device, dtype=dtype, backend=backend,
                       cuda_graphs=cuda_graphs and device.type == "cuda", max_graphs=max_graphs)


def _first_call_check(model: STT, compiled: CompiledSTT, dtype: torch.dtype, validate: bool) -> None:
    """Run the compiled module once (kernels compile and launch here): validated against the reference
    when `validate`, else only required to give finite logits."""
    if validate:
        log.info("stt_fast.compile: validating the %r backend against the reference model", compiled.backend)
        compiled.validation = _validate(model, compiled, dtype)
        return
    with torch.no_grad():
        logits = compiled(probe_clips(model, batch=1))
    if not torch.isfinite(logits).all():
        raise ValidationError(f"backend {compiled.backend!r} gave non-finite logits on a probe clip")


def compile(model: STT, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
            backend: str = "auto", cuda_graphs: bool = True, validate: bool = True, channels_last: bool = True,
            max_graphs: int = 8, **backend_options) -> CompiledSTT:
    """Return a module computing ``model``'s logits much faster, checked against it when ``validate``.

    model: a reference ``stt_fast.STT`` in eval mode (any config, with its weights); it is not modified.
    device: where the compiled module runs; defaults to the model's device.
    dtype: compute precision: "fp32", "fp16", "bf16" (or torch dtypes), or None / "auto": float16 on CUDA;
        on a CPU bfloat16 where it has native bf16 arithmetic (avx512_bf16, amx_bf16), else float32, with
        float32 as the fallback when bfloat16 fails to build or validate (stt_fast.compiler.precision). What
        was chosen and why is kept as ``.dtype_reason`` and logged.
    backend: "auto" ("triton" on CUDA GPUs of sm_80 and newer, else "torch"; on the CPU "openvino",
        else "onnxruntime", else "torch", the first installed); "triton" (fused Triton attention and
        add+LayerNorm kernels); "torch" (PyTorch only: SDPA over regrouped tokens, folded BatchNorm,
        channels_last); "onnxruntime" and "openvino" (the same program exported to ONNX, cached on disk,
        run by ONNX Runtime or by OpenVINO's CPU plugin); "tensorrt" (an FP16 TensorRT engine, built or
        reused from a cache; see stt_fast.export). With "auto", a backend that fails to build, compile
        its kernels, launch them or validate on this machine is replaced by the next one ("triton" ->
        "torch"; "openvino" -> "onnxruntime" -> "torch"): the reason is logged once and kept as
        ``.fallback_reason``. A backend named explicitly raises.
    cuda_graphs: on CUDA, capture one graph per batch bucket (1, 2, 4, ..., 64, then multiples of 64:
        a batch of 3 runs in the graph of 4) and clip shape, at most ``max_graphs`` kept (least recently
        used evicted), so that small batches are not launch-bound. The module serves one stream: calls
        from several threads are serialised.
    validate: run the reference and the compiled module side by side on probe clips and raise
        ValidationError, with the measured error, when the logits differ beyond the precision's
        tolerance (stt_fast.accuracy.TOLERANCES); the report is kept as ``.validation``. Without it,
        backend="auto" still runs one probe clip, so that a backend that cannot run falls back.
    channels_last: run the backbone's convolutions on channels_last activations.
    backend_options: options of the "onnxruntime", "openvino" and "tensorrt" backends (cache_dir; for
        tensorrt also batch, workspace_gib, optimization_level, rebuild: see stt_fast.export.tensorrt_backend).

    Every backend applies the same rewrites (stt_fast.compiler.program): BatchNorm folding, packed
    qkv, proj and temporal_fc folded, fused residual + LayerNorm, last block pruned to the cls row.
    """
    if not isinstance(model, STT):
        raise ValueError(f"stt_fast.compile expects an stt_fast.STT, got {type(model).__name__}")
    if model.training:
        raise ValueError("the model is in training mode; call model.eval() before stt_fast.compile(model)")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    asked = _resolve_dtype(dtype)
    if asked is None:
        dtypes, dtype_reason = default_precisions(device)
    else:
        dtypes, dtype_reason = [asked], f"{str(asked)[6:]}: asked for"
    if backend == "auto":
        plans = [(name, dt) for dt in dtypes for name in auto_candidates(model, device, dt)]
    else:
        if backend == "triton" and (problem := triton_problem(model, device)) is not None:
            raise ValueError(f"backend 'triton' cannot run this model: {problem}")
        plans = [(backend, dt) for dt in dtypes if asked is not None or runs(backend, dt)] or [(backend, torch.float32)]
    unknown = sorted(set(backend_options) - BACKEND_OPTIONS.get(plans[0][0], set()))
    if unknown:
        raise ValueError(f"unknown options for backend {plans[0][0]!r}: {unknown}")
    automatic = backend == "auto" or asked is None  # a failure falls back to the next plan

    reasons: list[str] = []
    for i, (name, dt) in enumerate(plans):
        options = {k: v for k, v in backend_options.items() if k in BACKEND_OPTIONS.get(name, set())}
        try:
            compiled = _build(model, name, device, dt, cuda_graphs=cuda_graphs, channels_last=channels_last,
                              max_graphs=max_graphs, backend_options=options)
            if validate or automatic:
                _first_call_check(model, compiled, dt, validate)
        except Exception as e:  # any failure of an automatic choice falls back
            if not automatic or i == len(plans) - 1:
                raise
            reason = f"{name} {str(dt)[6:]} failed here ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
            reasons.append(reason)
            _warn_once(f"stt_fast.compile: {reason}; falling back to {plans[i + 1][0]} {str(plans[i + 1][1])[6:]}")
            continue
        compiled.fallback_reason = "; ".join(reasons) or None
        compiled.dtype_reason = dtype_reason if dt == dtypes[0] else \
            f"{str(dt)[6:]}: {str(dtypes[0])[6:]} was tried first ({dtype_reason.split(': ', 1)[-1]}) and failed"
        log.info("stt_fast.compile: %s backend, %s", compiled.backend, compiled.dtype_reason)
        return compiled.eval()
    raise AssertionError("unreachable: the last plan returns or raises")
