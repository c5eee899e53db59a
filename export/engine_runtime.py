"""Run an STT TensorRT engine: the sidecar that travels with it, the checks before loading, the runner.

This file imports nothing from stt_fast and nothing heavy at module level, so it can be copied alone
to an edge device (a Jetson) with the engine and its sidecar and run there without PyTorch:

    python3 engine_runtime.py run model.engine --clips clips.npy      # numpy [B, T, 3, H, W]
    python3 engine_runtime.py sidecar model.engine --onnx model.fp16.onnx --batch 1:4:16
                                                                      # for an engine built by trtexec

Inside the package it is stt_fast.export.engine_runtime, used by the builder and by
stt_fast.compile(backend="tensorrt").

The sidecar (model.engine.json) records what an engine is tied to: the TensorRT version that built it,
the GPU name and compute capability, and whether it was built version- or hardware-compatible. An
engine is refused, with the reason, when the TensorRT or GPU at hand cannot run it, when its bytes do
not match the hash in the sidecar (truncated or replaced), or when the sidecar is missing.

EngineRunner is one small class with three buffer back ends: "torch" (torch CUDA tensors, the engine
enqueued on the current torch stream), and, without PyTorch, "cuda-python" (NVIDIA's cuda.bindings
runtime API, installed as wheels) or "pycuda" (numpy in, numpy out for both).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

SIDECAR_FORMAT = "stt_fast-engine-v1"
LABELS = ["Happy", "Sad", "Neutral", "Angry", "Surprise", "Disgust", "Fear"]
SIDECAR_SUFFIX = ".json"
INPUT_NAME = "clips"
OUTPUT_NAME = "logits"
HARDWARE_LEVELS = ("none", "ampere_plus", "same_compute_capability")


class EngineCompatibilityError(ValueError):
    """An engine that cannot run here (wrong TensorRT, wrong GPU, damaged file), with the reason."""


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise ImportError("TensorRT is not installed: on x86-64 'pip install tensorrt'; on a Jetson it comes "
                          "with JetPack (python3-libnvinfer)") from e
    return tensorrt


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    return Path(str(engine_path) + SIDECAR_SUFFIX)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_sidecar(*, engine_bytes: bytes, onnx_meta: dict[str, str], onnx_file: str, onnx_sha256: str,
                 tensorrt_version: str, gpu: dict[str, str], batch: tuple[int, int, int],
                 version_compatible: bool = False, hardware_compatibility: str = "none",
                 builder: dict | None = None, build_seconds: float | None = None) -> dict[str, Any]:
    """The sidecar of an engine built from an stt_fast ONNX file (its metadata_props as onnx_meta)."""
    if "stt_fast.config" not in onnx_meta:
        raise ValueError(f"{onnx_file} carries no stt_fast config: not exported by stt_fast")
    config = json.loads(onnx_meta["stt_fast.config"])
    shape = [config["num_frames"], 3, config["image_size"], config["image_size"]]
    return {
        "format": SIDECAR_FORMAT,
        "stt_fast_version": onnx_meta.get("stt_fast.version"),
        "tensorrt_version": tensorrt_version,
        "gpu": gpu,
        "version_compatible": version_compatible,
        "hardware_compatibility": hardware_compatibility,
        "precision": onnx_meta.get("stt_fast.precision", "fp32"),
        "input": {"name": INPUT_NAME, "dtype": onnx_meta.get("stt_fast.input_dtype", "float32"), "shape": [-1, *shape]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [-1, config["num_classes"]]},
        "labels": LABELS if config["num_classes"] == len(LABELS) else None,
        "profile": {"min": batch[0], "opt": batch[1], "max": batch[2]},
        "config": config,
        "onnx": {"file": onnx_file, "sha256": onnx_sha256, "opset": onnx_meta.get("stt_fast.opset"),
                 "attention_op": onnx_meta.get("stt_fast.attention_op") == "true"},
        "checkpoint_sha256": onnx_meta.get("stt_fast.checkpoint_sha256") or None,
        "engine_sha256": sha256_bytes(engine_bytes),
        "builder": builder,
        "build_seconds": None if build_seconds is None else round(build_seconds, 1),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "accuracy": None,
    }


def write_sidecar(engine_path: str | os.PathLike, sidecar: dict[str, Any]) -> Path:
    """Write the sidecar beside the engine, atomically (temporary file, then rename). This file stays
    standalone for edge devices, hence its own three lines instead of stt_fast.files.atomic_output."""
    path = sidecar_path(engine_path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(sidecar, indent=2))
    os.replace(tmp, path)
    return path


def read_sidecar(engine_path: str | os.PathLike) -> dict[str, Any]:
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise EngineCompatibilityError(f"no sidecar {path.name} beside {engine_path}: an engine cannot be checked "
                                       "without it (rebuild it with 'stt-fast build')")
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EngineCompatibilityError(f"sidecar {path} is unreadable: {e}") from e
    if sidecar.get("format") != SIDECAR_FORMAT:
        raise EngineCompatibilityError(f"sidecar {path} has format {sidecar.get('format')!r}, expected "
                                       f"{SIDECAR_FORMAT!r}")
    return sidecar


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def check_compatible(sidecar: dict[str, Any], *, tensorrt_version: str, gpu_name: str,
                     compute_capability: str) -> list[str]:
    """Raise EngineCompatibilityError if this TensorRT and GPU cannot run the engine; return warnings.

    TensorRT: the same major.minor.patch, or for a version-compatible engine the same major and a
    runtime at least as new. GPU: the same compute capability, or for a hardware-compatible
    ("ampere_plus") engine any compute capability >= 8.0. A different GPU name with the same compute
    capability runs, but may run slower than on the GPU it was tuned for: a warning.
    """
    built, here = sidecar["tensorrt_version"], tensorrt_version
    b, h = _version_tuple(built), _version_tuple(here)
    if sidecar.get("version_compatible"):
        if h[:1] != b[:1] or h < b:
            raise EngineCompatibilityError(
                f"engine built with TensorRT {built} (version-compatible) cannot run on TensorRT {here}: "
                f"it needs TensorRT {b[0]}.x at {built} or newer")
    elif h != b:
        raise EngineCompatibilityError(
            f"engine built with TensorRT {built} cannot run on TensorRT {here}: rebuild it here "
            "(or build it with --version-compatible)")
    gpu = sidecar["gpu"]
    level = sidecar.get("hardware_compatibility", "none")
    cc_built, cc_here = _version_tuple(gpu["compute_capability"]), _version_tuple(compute_capability)
    if level == "ampere_plus":
        if cc_here < (8, 0):
            raise EngineCompatibilityError(
                f"engine is hardware-compatible for Ampere and newer (compute capability >= 8.0); this GPU, "
                f"{gpu_name}, is {compute_capability}")
    elif cc_here != cc_built:
        raise EngineCompatibilityError(
            f"engine was built for {gpu['name']} (compute capability {gpu['compute_capability']}); this GPU, "
            f"{gpu_name}, is {compute_capability}: rebuild it on this GPU (or build with --hardware-compatible)")
    warnings = []
    if level == "none" and gpu_name != gpu["name"]:
        warnings.append(f"engine was tuned on {gpu['name']}, running on {gpu_name} (same compute capability)")
    return warnings


def check_engine_bytes(engine_bytes: bytes, sidecar: dict[str, Any], engine_path: str | os.PathLike) -> None:
    if sha256_bytes(engine_bytes) != sidecar.get("engine_sha256"):
        raise EngineCompatibilityError(f"{engine_path} does not match the hash in its sidecar: the file is "
                                       "truncated, corrupted or from another build")


class _TorchBuffers:
    """torch CUDA tensors as the engine's buffers, enqueued on the current torch stream."""

    def __init__(self, device: int) -> None:
        import torch

        self.torch = torch
        self.device = torch.device("cuda", device)

    def run(self, context, clips, input_dtype: str, num_classes: int):
        torch = self.torch
        dtype = {"float32": torch.float32, "uint8": torch.uint8}[input_dtype]
        clips = torch.as_tensor(clips).to(self.device, dtype).contiguous()
        out = torch.empty((clips.shape[0], num_classes), dtype=torch.float32, device=self.device)
        context.set_input_shape(INPUT_NAME, tuple(clips.shape))
        context.set_tensor_address(INPUT_NAME, clips.data_ptr())
        context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execution failed (execute_async_v3 returned False)")
        return out

    def concat(self, parts):
        return self.torch.cat(parts)


class _PyCudaBuffers:
    """numpy in, numpy out; device memory and a stream from pycuda (no PyTorch needed)."""

    def __init__(self, device: int) -> None:
        import numpy as np
        import pycuda.driver as cuda

        cuda.init()
        self.np, self.cuda = np, cuda
        self.context = cuda.Device(device).retain_primary_context()
        self.stream = None
        self._capacity = 0
        self._d_in = self._d_out = None

    def run(self, context, clips, input_dtype: str, num_classes: int):
        np, cuda = self.np, self.cuda
        self.context.push()
        try:
            if self.stream is None:
                self.stream = cuda.Stream()
            host_in = np.ascontiguousarray(clips, dtype=np.float32 if input_dtype == "float32" else np.uint8)
            host_out = np.empty((host_in.shape[0], num_classes), dtype=np.float32)
            if host_in.nbytes + host_out.nbytes > self._capacity:  # grow once, reuse after
                self._d_in, self._d_out = cuda.mem_alloc(host_in.nbytes), cuda.mem_alloc(host_out.nbytes)
                self._capacity = host_in.nbytes + host_out.nbytes
            cuda.memcpy_htod_async(self._d_in, host_in, self.stream)
            context.set_input_shape(INPUT_NAME, host_in.shape)
            context.set_tensor_address(INPUT_NAME, int(self._d_in))
            context.set_tensor_address(OUTPUT_NAME, int(self._d_out))
            if not context.execute_async_v3(self.stream.handle):
                raise RuntimeError("TensorRT execution failed (execute_async_v3 returned False)")
            cuda.memcpy_dtoh_async(host_out, self._d_out, self.stream)
            self.stream.synchronize()
            return host_out
        finally:
            self.context.pop()

    def concat(self, parts):
        return self.np.concatenate(parts)


def _cuda_check(result, what: str):
    """cuda-python returns (error, *values): raise on an error, return the value(s)."""
    from cuda.bindings import runtime as cudart

    error, *values = result
    if error != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"{what} failed: {error.name} (is there a CUDA GPU and driver?)")
    return values[0] if len(values) == 1 else tuple(values)


class _CudaRuntimeBuffers:
    """numpy in, numpy out; device memory and a stream from NVIDIA's cuda-python (cuda.bindings.runtime),
    which installs as wheels where pycuda has to be compiled."""

    def __init__(self, device: int) -> None:
        import numpy as np
        from cuda.bindings import runtime as cudart

        self.np, self.cudart = np, cudart
        _cuda_check(cudart.cudaSetDevice(device), "cudaSetDevice")
        self.stream = _cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._capacity = (0, 0)
        self._d_in = self._d_out = None

    def _ensure(self, in_bytes: int, out_bytes: int) -> None:
        if in_bytes <= self._capacity[0] and out_bytes <= self._capacity[1]:
            return  # grow once, reuse after
        for pointer in (self._d_in, self._d_out):
            if pointer is not None:
                _cuda_check(self.cudart.cudaFree(pointer), "cudaFree")
        self._d_in = _cuda_check(self.cudart.cudaMalloc(in_bytes), "cudaMalloc")
        self._d_out = _cuda_check(self.cudart.cudaMalloc(out_bytes), "cudaMalloc")
        self._capacity = (in_bytes, out_bytes)

    def run(self, context, clips, input_dtype: str, num_classes: int):
        np, cudart = self.np, self.cudart
        host_in = np.ascontiguousarray(clips, dtype=np.float32 if input_dtype == "float32" else np.uint8)
        host_out = np.empty((host_in.shape[0], num_classes), dtype=np.float32)
        self._ensure(host_in.nbytes, host_out.nbytes)
        kind = cudart.cudaMemcpyKind
        _cuda_check(cudart.cudaMemcpyAsync(self._d_in, host_in.ctypes.data, host_in.nbytes,
                                           kind.cudaMemcpyHostToDevice, self.stream), "cudaMemcpyAsync")
        context.set_input_shape(INPUT_NAME, host_in.shape)
        context.set_tensor_address(INPUT_NAME, int(self._d_in))
        context.set_tensor_address(OUTPUT_NAME, int(self._d_out))
        if not context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT execution failed (execute_async_v3 returned False)")
        _cuda_check(cudart.cudaMemcpyAsync(host_out.ctypes.data, self._d_out, host_out.nbytes,
                                           kind.cudaMemcpyDeviceToHost, self.stream), "cudaMemcpyAsync")
        _cuda_check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return host_out

    def concat(self, parts):
        return self.np.concatenate(parts)


BUFFERS = {"torch": _TorchBuffers, "pycuda": _PyCudaBuffers, "cuda-python": _CudaRuntimeBuffers}


def default_buffers() -> str:
    """Without PyTorch: cuda-python where installed (wheels), else pycuda."""
    import importlib.util

    try:
        found = importlib.util.find_spec("cuda.bindings") is not None
    except ModuleNotFoundError:
        found = False
    return "cuda-python" if found else "pycuda"


def current_gpu(device: int, buffers: str) -> tuple[str, str]:
    """(name, compute capability) of CUDA device `device`, asked through the chosen buffer back end."""
    if buffers == "torch":
        import torch

        props = torch.cuda.get_device_properties(device)
        return props.name, f"{props.major}.{props.minor}"
    if buffers == "cuda-python":
        from cuda.bindings import runtime as cudart

        props = _cuda_check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        return name.rstrip("\x00"), f"{props.major}.{props.minor}"
    import pycuda.driver as cuda

    cuda.init()
    dev = cuda.Device(device)
    major, minor = dev.compute_capability()
    return dev.name(), f"{major}.{minor}"


class EngineRunner:
    """Load a checked engine and run it: clips [B, T, 3, H, W] -> logits [B, K] float32.

    buffers="torch": inputs are anything torch.as_tensor takes, logits a CUDA tensor.
    buffers="cuda-python" or "pycuda": inputs are numpy arrays, logits a numpy array (no PyTorch).
    Batches above the engine's profile maximum run in chunks.
    """

    def __init__(self, engine_path: str | os.PathLike, *, buffers: str = "torch", device: int = 0,
                 engine_bytes: bytes | None = None, sidecar: dict[str, Any] | None = None) -> None:
        if buffers not in BUFFERS:
            raise ValueError(f"buffers must be one of {sorted(BUFFERS)}, got {buffers!r}")
        self.path = Path(engine_path)
        if engine_bytes is None:
            if not self.path.is_file():
                raise FileNotFoundError(f"engine not found: {self.path}")
            engine_bytes = self.path.read_bytes()
        # The file is checked before TensorRT is asked for: a damaged engine is named as such anywhere.
        self.sidecar = read_sidecar(self.path) if sidecar is None else sidecar
        check_engine_bytes(engine_bytes, self.sidecar, self.path)
        trt = import_tensorrt()
        name, capability = current_gpu(device, buffers)
        self.warnings = check_compatible(self.sidecar, tensorrt_version=trt.__version__, gpu_name=name,
                                         compute_capability=capability)
        for warning in self.warnings:
            print(f"[stt_fast] warning: {warning}", file=sys.stderr)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if self.sidecar.get("version_compatible"):
            self._runtime.engine_host_code_allowed = True  # the lean runtime embedded in the plan
        self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise EngineCompatibilityError(f"TensorRT could not deserialize {self.path} (see its log above)")
        self.context = self.engine.create_execution_context()
        self.buffers = BUFFERS[buffers](device)
        self.input_dtype = self.sidecar["input"]["dtype"]
        self.num_classes = int(self.sidecar["output"]["shape"][-1])
        self.max_batch = int(self.sidecar["profile"]["max"])

    def __call__(self, clips):
        batch = clips.shape[0]
        if batch <= self.max_batch:
            return self.buffers.run(self.context, clips, self.input_dtype, self.num_classes)
        parts = [self.buffers.run(self.context, clips[i:i + self.max_batch], self.input_dtype, self.num_classes)
                 for i in range(0, batch, self.max_batch)]
        return self.buffers.concat(parts)


def _sidecar_for_existing_engine(args) -> int:
    """For an engine built elsewhere (trtexec): its sidecar from the ONNX file it was built from."""
    import onnx

    engine = Path(args.engine)
    model = onnx.load(args.onnx, load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    trt = import_tensorrt()
    name, capability = current_gpu(args.device, args.buffers)
    batch = tuple(int(x) for x in args.batch.split(":"))
    sidecar = make_sidecar(engine_bytes=engine.read_bytes(), onnx_meta=meta, onnx_file=Path(args.onnx).name,
                           onnx_sha256=hashlib.sha256(Path(args.onnx).read_bytes()).hexdigest(),
                           tensorrt_version=trt.__version__, gpu={"name": name, "compute_capability": capability},
                           batch=batch, builder={"tool": "external (trtexec)"})
    print(f"wrote {write_sidecar(engine, sidecar)}")
    return 0


def _run(args) -> int:
    import numpy as np

    runner = EngineRunner(args.engine, buffers=args.buffers, device=args.device)
    logits = runner(np.load(args.clips))
    logits = logits if isinstance(logits, np.ndarray) else logits.cpu().numpy()
    labels = runner.sidecar.get("labels") or [str(i) for i in range(logits.shape[1])]
    for row in logits:
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        print(json.dumps({"label": labels[int(row.argmax())],
                          "probabilities": {name: round(float(p), 6) for name, p in zip(labels, probs)}}))
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Run an STT TensorRT engine (no PyTorch needed)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="logits of clips saved as a .npy array")
    run.add_argument("engine")
    run.add_argument("--clips", required=True, help=".npy array [B, T, 3, H, W], float32 in [0, 1] or uint8")
    run.add_argument("--buffers", default=default_buffers(), choices=sorted(BUFFERS),
                     help="device memory from cuda-python, pycuda or torch (default: cuda-python where installed)")
    run.add_argument("--device", type=int, default=0)
    run.set_defaults(func=_run)
    side = sub.add_parser("sidecar", help="write the sidecar of an engine built with trtexec")
    side.add_argument("engine")
    side.add_argument("--onnx", required=True, help="the stt_fast ONNX file the engine was built from")
    side.add_argument("--batch", required=True, help="the MIN:OPT:MAX batch profile it was built with")
    side.add_argument("--device", type=int, default=0)
    side.add_argument("--buffers", default=default_buffers(), choices=sorted(BUFFERS),
                      help="which CUDA binding asks the GPU's name")
    side.set_defaults(func=_sidecar_for_existing_engine)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
