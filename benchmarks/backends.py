"""Every way the suite can run STT, behind one interface: build(model, device, workdir) -> Built.

    eager-fp32            the reference model, float32
    eager-fp16/-bf16      the reference model under autocast (GPU)
    torch-compile         torch.compile of the reference (mode max-autotune on GPU, default on CPU)
    stt_fast-fp32/-fp16/-bf16   stt_fast.compile in each precision, its default backend (half precisions on GPU)
    stt_fast-torch-fp32   stt_fast.compile(backend="torch"): the PyTorch-only path
    onnxruntime-fp32/-fp16      the exported graphs in ONNX Runtime (CUDA EP on GPU when present)
    tensorrt-fp16         stt_fast.compile(backend="tensorrt") (TensorRT and a GPU)
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from stt_fast.model import STT


@dataclass
class Built:
    run: Callable[[torch.Tensor], torch.Tensor]  # clips on input_device -> logits
    input_device: torch.device
    build_seconds: float
    size_bytes: int | None = None
    notes: str = ""


@dataclass(frozen=True)
class Backend:
    name: str
    precision: str
    unavailable: Callable[[torch.device], str | None]
    build: Callable[[STT, torch.device, Path], Built]


def _needs_cuda(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "half precision backends run on a CUDA GPU in this suite"


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _timed(build: Callable[[], tuple[Callable, int | None, str]], device: torch.device,
           input_device: torch.device | None = None) -> Built:
    start = time.perf_counter()
    run, size, notes = build()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Built(run, input_device or device, time.perf_counter() - start, size, notes)


def _eager(dtype: torch.dtype | None):
    def build(model: STT, device: torch.device, workdir: Path) -> Built:
        def make():
            m = copy.deepcopy(model).to(device).eval()
            autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None
                        else contextlib.nullcontext())

            def run(clips):
                with torch.no_grad(), autocast:
                    return m(clips)

            return run, _param_bytes(m), "autocast" if dtype is not None else ""

        return _timed(make, device)

    return build


def _torch_compile(model: STT, device: torch.device, workdir: Path) -> Built:
    def make():
        m = copy.deepcopy(model).to(device).eval()
        mode = "max-autotune" if device.type == "cuda" else "default"
        compiled = torch.compile(m, mode=mode)

        def run(clips):
            with torch.no_grad():
                return compiled(clips)

        return run, _param_bytes(m), f"mode={mode}; compilation happens at each batch size's first call"

    return _timed(make, device)


def _torch_compile_unavailable(device: torch.device) -> str | None:
    if device.type == "cpu" and not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
        return "torch.compile on the CPU needs a C++ compiler"
    return None


def _stt_fast(dtype: torch.dtype, backend: str = "auto"):
    def build(model: STT, device: torch.device, workdir: Path) -> Built:
        import stt_fast

        def make():
            cache = workdir / f"cache-{backend}-{dtype}"
            options = {"cache_dir": cache} if backend == "auto" and device.type == "cpu" else {}
            compiled = stt_fast.compile(model, device=device, dtype=dtype, backend=backend, validate=False,
                                        **options)
            size = _param_bytes(compiled.program) or sum(f.stat().st_size for f in cache.rglob("*.onnx"))
            return compiled, size, f"backend={compiled.backend}"

        return _timed(make, device)

    return build


def _ort_unavailable(device: torch.device) -> str | None:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return "onnxruntime / onnxscript not installed (pip install 'stt-fast[export]')"
    return None


def _onnxruntime(precision: str):
    def build(model: STT, device: torch.device, workdir: Path) -> Built:
        import onnxruntime as ort
        from stt_fast.export import export_onnx, simplify_onnx
        from stt_fast.export.parity import ort_session, run_session

        def make():
            raw = export_onnx(model, workdir / f"raw-{precision}.onnx", precision=precision)
            path = simplify_onnx(raw, workdir / f"model-{precision}.onnx").path
            use_cuda = device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
            session = ort_session(path, providers)
            note = "CUDA EP, inputs and logits copied host<->device per call" if use_cuda else "CPU EP"
            return (lambda clips: run_session(session, clips)), path.stat().st_size, note

        return _timed(make, device, input_device=torch.device("cpu"))

    return build


def _tensorrt_unavailable(device: torch.device) -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed"
    return None if device.type == "cuda" else "TensorRT needs a CUDA GPU"


def _tensorrt(model: STT, device: torch.device, workdir: Path) -> Built:
    import stt_fast

    def make():
        compiled = stt_fast.compile(model, device=device, backend="tensorrt", dtype=torch.float16,
                                    cache_dir=workdir / "engines", batch="1:8:256", validate=False)
        engine = next((workdir / "engines").rglob("*.engine"))
        return compiled, engine.stat().st_size, "profile 1:8:256"

    return _timed(make, device)


BACKENDS: dict[str, Backend] = {b.name: b for b in [
    Backend("eager-fp32", "fp32", lambda d: None, _eager(None)),
    Backend("eager-fp16", "fp16", _needs_cuda, _eager(torch.float16)),
    Backend("eager-bf16", "bf16", _needs_cuda, _eager(torch.bfloat16)),
    Backend("torch-compile", "fp32", _torch_compile_unavailable, _torch_compile),
    Backend("stt_fast-fp32", "fp32", lambda d: None, _stt_fast(torch.float32)),
    Backend("stt_fast-fp16", "fp16", _needs_cuda, _stt_fast(torch.float16)),
    Backend("stt_fast-bf16", "bf16", _needs_cuda, _stt_fast(torch.bfloat16)),
    Backend("stt_fast-torch-fp32", "fp32", lambda d: None, _stt_fast(torch.float32, "torch")),
    Backend("onnxruntime-fp32", "fp32", _ort_unavailable, _onnxruntime("fp32")),
    Backend("onnxruntime-fp16", "fp16", _ort_unavailable, _onnxruntime("fp16")),
    Backend("tensorrt-fp16", "fp16", _tensorrt_unavailable, _tensorrt),
]}
REFERENCE = "eager-fp32"


def resolve(names: list[str] | None) -> list[Backend]:
    if not names:
        return list(BACKENDS.values())
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; known: {', '.join(BACKENDS)}")
    return [BACKENDS[n] for n in names]
