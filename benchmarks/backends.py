"""Every way the suite can run STT, behind one interface: build(model, device, workdir) -> Built.

Peers (what a user would run instead of stt_fast):
    eager-fp32            the reference model, float32 (also the suite's accuracy reference)
    eager-fp16/-bf16      the reference model under autocast (GPU; bf16 also on CPUs with native bf16)
    torch-compile         torch.compile of the reference (mode max-autotune on a GPU, default on the CPU,
                          where max-autotune has nothing to tune)
    torch-compile-fp16    the same under fp16 autocast (GPU)
    onnxruntime-plain-fp32  ONNX Runtime on a plain torch.onnx.export of the reference (CUDA EP on a GPU
                          when present), as a user would export it
    openvino-fp32         OpenVINO (CPU plugin, f32 inference precision) on that same plain export
    openvino-default      the same as a user gets it, no precision asked for: OpenVINO computes in bf16 on
                          CPUs with native bf16 (its documented default), else in f32; its row's precision
                          says which
    torch-tensorrt-fp16   Torch-TensorRT compile of the reference (GPU, when installed)
Ours:
    stt_fast-fp32/-fp16/-bf16   stt_fast.compile in each precision, its default backend (fp16 on a GPU,
                          bf16 on a GPU or a CPU with native bf16); on the CPU that default is OpenVINO on
                          stt_fast's graph
    stt_fast-torch-fp32   stt_fast.compile(backend="torch"): the PyTorch-only path
    stt_fast-onnxruntime-fp32/-fp16   stt_fast's exported graph (the rewritten program) in ONNX Runtime
    stt_fast-int8         stt_fast's program quantised to int8 (stt-fast quantize; calibrated on the suite's
                          random probe clips, so its accuracy here is a floor), run by OpenVINO, on CPUs with
                          VNNI or AMX-INT8
    tensorrt-fp16         stt_fast.compile(backend="tensorrt") (TensorRT and a GPU)
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from stt_fast.flops import model_cost, program_flops
from stt_fast.model import STT

ROLES = ("peer", "ours")


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
    role: str  # "peer": what a user would run instead; "ours": stt_fast
    unavailable: Callable[[torch.device], str | None]
    build: Callable[[STT, torch.device, Path], Built]
    executes: str = "reference"  # whose FLOPs the backend executes: "reference" or "program" (stt_fast's)

    def executed_flops(self, config) -> int:
        """FLOPs per clip this backend executes (stt_fast's program prunes and folds work)."""
        return program_flops(config) if self.executes == "program" else model_cost(config).flops_per_clip


def _needs_cuda(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "half precision backends run on a CUDA GPU in this suite"


def _cpu_bf16() -> str | None:
    """This CPU's native bf16 instruction set, or None (the hardware's, whatever stt_fast.compile assumes)."""
    from stt_fast.compiler.precision import native_bf16
    from stt_fast.environment import cpu_isa

    return native_bf16(cpu_isa())


def _openvino_default_precision() -> str:
    """What OpenVINO's CPU plugin computes in when not told: asked of OpenVINO itself ("fp32" without it)."""
    try:
        import openvino as ov

        hint = str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")).lower()
    except Exception:
        return "fp32"
    return "bf16" if "bf16" in hint or "bfloat16" in hint else "fp16" if "f16" in hint else "fp32"


def _needs_bf16_units(device: torch.device) -> str | None:
    if device.type == "cuda" or _cpu_bf16():
        return None
    return "this CPU has no native bf16 arithmetic (avx512_bf16 or amx_bf16): bf16 would be emulated"


def _needs(*modules: str, extra: str):
    def unavailable(device: torch.device) -> str | None:
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        return f"{', '.join(missing)} not installed (pip install 'stt-fast[{extra}]')" if missing else None

    return unavailable


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _timed(build: Callable[[], tuple[Callable, int | None, str]], device: torch.device,
           input_device: torch.device | None = None) -> Built:
    start = time.perf_counter()
    run, size, notes = build()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Built(run, input_device or device, time.perf_counter() - start, size, notes)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _eager(dtype: torch.dtype | None):
    def build(model: STT, device: torch.device, workdir: Path) -> Built:
        def make():
            m = copy.deepcopy(model).to(device).eval()

            def run(clips):
                with torch.no_grad(), _autocast(device, dtype):
                    return m(clips)

            return run, _param_bytes(m), "autocast" if dtype is not None else ""

        return _timed(make, device)

    return build


def _torch_compile(dtype: torch.dtype | None):
    def build(model: STT, device: torch.device, workdir: Path) -> Built:
        def make():
            m = copy.deepcopy(model).to(device).eval()
            mode = "max-autotune" if device.type == "cuda" else "default"
            compiled = torch.compile(m, mode=mode)

            def run(clips):
                with torch.no_grad(), _autocast(device, dtype):
                    return compiled(clips)

            return run, _param_bytes(m), (f"mode={mode}{', fp16 autocast' if dtype else ''}; compilation happens at "
                                          "each batch size's first call")

        return _timed(make, device)

    return build


def _torch_compile_unavailable(device: torch.device) -> str | None:
    if device.type == "cpu" and not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
        return "torch.compile on the CPU needs a C++ compiler"
    return None


def _torch_compile_fp16_unavailable(device: torch.device) -> str | None:
    return _needs_cuda(device) or _torch_compile_unavailable(device)


def _stt_fast(dtype: torch.dtype, backend: str = "auto"):
    def build(model: STT, device: torch.device, workdir: Path) -> Built:
        import stt_fast

        def make():
            cache = workdir / f"cache-{backend}-{dtype}"
            exported = backend in ("auto", "onnxruntime", "openvino") and device.type == "cpu"
            options = {"cache_dir": cache} if exported else {}
            compiled = stt_fast.compile(model, device=device, dtype=dtype, backend=backend, validate=False,
                                        **options)
            graphs = [f.stat().st_size for f in cache.rglob("*.onnx")]
            size = sum(graphs) if graphs else _param_bytes(compiled.program)
            note = f"backend={compiled.backend}"
            if compiled.fallback_reason:
                note += f" (fell back: {compiled.fallback_reason})"
            return compiled, size, note

        return _timed(make, device)

    return build


def _int8_unavailable(device: torch.device) -> str | None:
    from stt_fast.export.quantize import int8_units

    from stt_fast.environment import cpu_isa

    if device.type != "cpu":
        return "int8 runs on the CPU in this suite"
    if not int8_units(cpu_isa()):
        return "this CPU has no int8 dot-product units (VNNI or AMX-INT8): int8 was slower than float32 on such a CPU"
    return _needs("openvino", "onnxruntime", "onnxscript", extra="openvino")(device)


def _stt_fast_int8(model: STT, device: torch.device, workdir: Path) -> Built:
    def make():
        from stt_fast.export.quantize import openvino_session, quantize_program

        from stt_fast.compiler.validation import probe_clips

        path = quantize_program(model, [probe_clips(model, batch=4, seed=s) for s in range(4)],
                                workdir / "program.int8.onnx", cache_dir=workdir / "cache-int8")
        from stt_fast.inputs import clips_to_float

        run = openvino_session(path)
        return (lambda clips: torch.from_numpy(run(clips_to_float(clips.cpu()).numpy()))), path.stat().st_size, \
            "OpenVINO on the int8 graph (calibrated on 16 random probe clips)"

    return _timed(make, device, input_device=torch.device("cpu"))


def _ort_unavailable(device: torch.device) -> str | None:
    return _needs("onnxruntime", "onnxscript", extra="export")(device)


def _plain_onnx(model: STT, workdir: Path) -> Path:
    from stt_fast.export.onnx_export import quiet_exporter

    """The reference model exported as a user would: torch.onnx.export with a dynamic batch (shared by
    the ONNX Runtime and OpenVINO peers)."""
    path = workdir / "plain-reference.onnx"
    if not path.is_file():
        c = model.config
        example = torch.rand(2, c.num_frames, 3, c.image_size, c.image_size)
        reference = copy.deepcopy(model).cpu().float().eval()
        with quiet_exporter():
            torch.onnx.export(reference, (example,), str(path), dynamo=True, input_names=["clips"],
                              output_names=["logits"], verbose=False,
                              dynamic_shapes={"clips": {0: torch.export.Dim("batch", min=1, max=4096)}})
    return path


def _providers(device: torch.device) -> tuple[list[str], str]:
    import onnxruntime as ort

    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDA EP, inputs and logits copied per call"
    return ["CPUExecutionProvider"], "CPU EP"


def _onnxruntime_ours(precision: str):
    def build(model: STT, device: torch.device, workdir: Path) -> Built:
        from stt_fast.export import export_onnx, simplify_onnx
        from stt_fast.export.parity import ort_session, run_session

        def make():
            raw = export_onnx(model, workdir / f"raw-{precision}.onnx", precision=precision)
            path = simplify_onnx(raw, workdir / f"model-{precision}.onnx").path
            providers, note = _providers(device)
            session = ort_session(path, providers)
            return (lambda clips: run_session(session, clips)), path.stat().st_size, \
                f"{note}; stt_fast's exported graph (the rewritten program)"

        return _timed(make, device, input_device=torch.device("cpu"))

    return build


def _onnxruntime_plain(model: STT, device: torch.device, workdir: Path) -> Built:
    from stt_fast.export.parity import ort_session, run_session

    def make():
        path = _plain_onnx(model, workdir)
        providers, note = _providers(device)
        session = ort_session(path, providers)
        return (lambda clips: run_session(session, clips)), path.stat().st_size, \
            f"{note}; torch.onnx.export of the reference model, ONNX Runtime's default graph optimisations"

    return _timed(make, device, input_device=torch.device("cpu"))


def _openvino_unavailable(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "OpenVINO runs on the CPU in this suite"
    return _needs("openvino", "onnxscript", extra="openvino")(device)


def _openvino(hint: str | None):
    """OpenVINO on the plain export: with an inference precision hint ("f32"), or as a user gets it (None)."""
    def build(model: STT, device: torch.device, workdir: Path) -> Built:
        def make():
            import numpy as np
            import openvino as ov

            path = _plain_onnx(model, workdir)
            config = {"PERFORMANCE_HINT": "LATENCY"} | ({"INFERENCE_PRECISION_HINT": hint} if hint else {})
            compiled = ov.Core().compile_model(str(path), "CPU", config)
            request = compiled.create_infer_request()
            used = compiled.get_property("INFERENCE_PRECISION_HINT")

            def run(clips):
                request.infer({0: np.ascontiguousarray(clips.cpu().numpy())})
                return torch.from_numpy(request.get_output_tensor(0).data.copy())

            asked = hint or "no precision asked for"
            return run, path.stat().st_size, (f"OpenVINO {ov.__version__} CPU plugin, {asked} (computes in {used}), "
                                              "latency hint, on torch.onnx.export of the reference model")

        return _timed(make, device, input_device=torch.device("cpu"))

    return build


def _tensorrt_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
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


def _torch_tensorrt_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("torch_tensorrt") is None:
        return "Torch-TensorRT is not installed"
    return None if device.type == "cuda" else "Torch-TensorRT needs a CUDA GPU"


def _torch_tensorrt(model: STT, device: torch.device, workdir: Path) -> Built:
    def make():
        import torch_tensorrt

        m = copy.deepcopy(model).to(device).eval()
        c = model.config
        example = torch.rand(8, c.num_frames, 3, c.image_size, c.image_size, device=device)
        spec = torch_tensorrt.Input(min_shape=(1, *example.shape[1:]), opt_shape=tuple(example.shape),
                                    max_shape=(256, *example.shape[1:]), dtype=torch.float32)
        compiled = torch_tensorrt.compile(m, ir="dynamo", inputs=[spec], enabled_precisions={torch.float16})

        def run(clips):
            with torch.no_grad():
                return compiled(clips)

        return run, _param_bytes(m), f"Torch-TensorRT {torch_tensorrt.__version__}, dynamo IR, fp16 enabled"

    return _timed(make, device)


BACKENDS: dict[str, Backend] = {b.name: b for b in [
    Backend("eager-fp32", "fp32", "peer", lambda d: None, _eager(None)),
    Backend("eager-fp16", "fp16", "peer", _needs_cuda, _eager(torch.float16)),
    Backend("eager-bf16", "bf16", "peer", _needs_bf16_units, _eager(torch.bfloat16)),
    Backend("torch-compile", "fp32", "peer", _torch_compile_unavailable, _torch_compile(None)),
    Backend("torch-compile-fp16", "fp16", "peer", _torch_compile_fp16_unavailable, _torch_compile(torch.float16)),
    Backend("onnxruntime-plain-fp32", "fp32", "peer", _ort_unavailable, _onnxruntime_plain),
    Backend("openvino-fp32", "fp32", "peer", _openvino_unavailable, _openvino("f32")),
    # its precision: what OpenVINO computes in here when not told (bf16 where the CPU has native bf16)
    Backend("openvino-default", _openvino_default_precision(), "peer", _openvino_unavailable, _openvino(None)),
    Backend("torch-tensorrt-fp16", "fp16", "peer", _torch_tensorrt_unavailable, _torch_tensorrt),
    Backend("stt_fast-fp32", "fp32", "ours", lambda d: None, _stt_fast(torch.float32), "program"),
    Backend("stt_fast-fp16", "fp16", "ours", _needs_cuda, _stt_fast(torch.float16), "program"),
    Backend("stt_fast-bf16", "bf16", "ours", _needs_bf16_units, _stt_fast(torch.bfloat16), "program"),
    Backend("stt_fast-torch-fp32", "fp32", "ours", lambda d: None, _stt_fast(torch.float32, "torch"), "program"),
    Backend("stt_fast-onnxruntime-fp32", "fp32", "ours", _ort_unavailable, _onnxruntime_ours("fp32"), "program"),
    Backend("stt_fast-onnxruntime-fp16", "fp16", "ours", _ort_unavailable, _onnxruntime_ours("fp16"), "program"),
    Backend("stt_fast-int8", "int8", "ours", _int8_unavailable, _stt_fast_int8, "program"),
    Backend("tensorrt-fp16", "fp16", "ours", _tensorrt_unavailable, _tensorrt, "program"),
]}
REFERENCE = "eager-fp32"


def resolve(names: list[str] | None) -> list[Backend]:
    if not names:
        return list(BACKENDS.values())
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; known: {', '.join(BACKENDS)}")
    return [BACKENDS[n] for n in names]
