"""Run an STT TensorRT engine: the sidecar that travels with it, the checks before loading, the runner.

This file imports nothing from stt_fast and nothing heavy at module level, so it can be copied alone
to an edge device (a Jetson) with the engine and its sidecar and run there without PyTorch:

    python3 engine_runtime.py run model.engine --clips clips.npy      # numpy [B, T, 3, H, W]
    python3 engine_runtime.py sidecar model.engine --onnx model.fp16.onnx
                                                                      # for an engine built by trtexec

Inside the package it is stt_fast.export.engine_runtime, used by the builder and by
stt_fast.compile(backend="tensorrt").

The sidecar (model.engine.json) records what an engine is tied to: the TensorRT version that built it,
the GPU name and compute capability, the operating system and CPU architecture, and whether it was
built version- or hardware-compatible. An engine is refused, with the reason, when the TensorRT, GPU or
platform at hand cannot run it, when its bytes do not match the hash in the sidecar (truncated or
replaced), when the sidecar is missing, or when the engine's own inputs, outputs and profile disagree
with the sidecar.

EngineRunner is one small class with three buffer back ends: "torch" (torch CUDA tensors, the engine
enqueued on the current torch stream), and, without PyTorch, "cuda-python" (NVIDIA's cuda.bindings
runtime API, installed as wheels) or "pycuda" (numpy in, numpy out for both).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

SIDECAR_FORMAT = "stt_fast-engine-v1"
LABELS = ["Happy", "Sad", "Neutral", "Angry", "Surprise", "Disgust", "Fear"]
SIDECAR_SUFFIX = ".json"
LAYERS_SUFFIX = ".layers.json"
INPUT_NAME = "clips"
OUTPUT_NAME = "logits"
# The graphs an stt_fast engine is built from: the whole model, and its two halves for the timeline
# (per-frame features, per-window classification). Each: (input name, output name).
GRAPHS = {"whole": (INPUT_NAME, OUTPUT_NAME), "frames": ("frames", "features"), "windows": ("features", "logits")}
HARDWARE_LEVELS = ("none", "ampere_plus", "same_compute_capability")
INPUT_DTYPES = ("float32", "uint8")
# Integrated GPUs of Jetson modules (Xavier, Orin, Thor): TensorRT's hardware compatibility is not
# supported there (TensorRT developer guide, "Hardware Compatibility"), and JetPack pins its own TensorRT.
JETSON_CAPABILITIES = ("7.2", "8.7", "10.1", "11.0")


class EngineCompatibilityError(ValueError):
    """An engine that cannot run here (wrong TensorRT, wrong GPU, damaged file), with the reason."""


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise ImportError("TensorRT is not installed: on x86-64 'pip install tensorrt'; on a Jetson it comes "
                          "with JetPack (python3-libnvinfer; a virtual environment sees it when created with "
                          "--system-site-packages)") from e
    return tensorrt


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    return Path(str(engine_path) + SIDECAR_SUFFIX)


def layers_path(engine_path: str | os.PathLike) -> Path:
    """Where the engine inspector's layer information is kept beside the engine."""
    return Path(str(engine_path) + LAYERS_SUFFIX)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def current_platform() -> dict[str, str]:
    """The operating system and CPU architecture an engine is built on: engines are not portable across
    them (an x86-64 engine does not load on a Jetson's aarch64, whatever the GPU)."""
    return {"os": platform.system(), "machine": platform.machine()}


def declared_io(onnx_meta: dict[str, str]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(graph, input, output) of an stt_fast ONNX file from its metadata: the graph's kind (GRAPHS) and its
    I/O tensors as {name, dtype, shape [-1, ...]}. The whole model's are derived from its config; the
    halves' are recorded at export (stt_fast.io), since their feature shapes depend on the backbone."""
    if "stt_fast.config" not in onnx_meta:
        raise ValueError("the ONNX file carries no stt_fast config: not exported by stt_fast")
    graph = onnx_meta.get("stt_fast.graph", "whole")
    if graph not in GRAPHS:
        raise ValueError(f"unknown stt_fast graph {graph!r}; expected one of {sorted(GRAPHS)}")
    if graph != "whole":
        io = json.loads(onnx_meta["stt_fast.io"])
        return graph, io["input"], io["output"]
    config = json.loads(onnx_meta["stt_fast.config"])
    shape = [config["num_frames"], 3, config["image_size"], config["image_size"]]
    clips = {"name": INPUT_NAME, "dtype": onnx_meta.get("stt_fast.input_dtype", "float32"), "shape": [-1, *shape]}
    return (graph, clips, {"name": OUTPUT_NAME, "dtype": "float32", "shape": [-1, config["num_classes"]]})


def make_sidecar(*, engine_bytes: bytes, onnx_meta: dict[str, str], onnx_file: str, onnx_sha256: str,
                 tensorrt_version: str, gpu: dict[str, str], batch: tuple[int, int, int],
                 version_compatible: bool = False, hardware_compatibility: str = "none",
                 builder: dict | None = None, build_seconds: float | None = None) -> dict[str, Any]:
    """The sidecar of an engine built from an stt_fast ONNX file (its metadata_props as onnx_meta)."""
    if "stt_fast.config" not in onnx_meta:
        raise ValueError(f"{onnx_file} carries no stt_fast config: not exported by stt_fast")
    config = json.loads(onnx_meta["stt_fast.config"])
    graph, inputs, outputs = declared_io(onnx_meta)
    return {
        "format": SIDECAR_FORMAT,
        "stt_fast_version": onnx_meta.get("stt_fast.version"),
        "graph": graph,
        "tensorrt_version": tensorrt_version,
        "gpu": gpu,
        "platform": current_platform(),
        "version_compatible": version_compatible,
        "hardware_compatibility": hardware_compatibility,
        "precision": onnx_meta.get("stt_fast.precision", "fp32"),
        "input": inputs,
        "output": outputs,
        "labels": LABELS if config["num_classes"] == len(LABELS) and outputs["name"] == OUTPUT_NAME else None,
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
    """major.minor.patch.build as four integers (missing fields 0): '10.3.0.30' -> (10, 3, 0, 30)."""
    fields = [int(x) for x in re.findall(r"\d+", version)[:4]]
    return tuple(fields + [0] * (4 - len(fields)))


def is_jetson(compute_capability: str) -> bool:
    """A Jetson module's integrated GPU, known by its compute capability."""
    return compute_capability in JETSON_CAPABILITIES


def check_hardware_level(level: str, compute_capability: str) -> None:
    """ValueError unless engines of hardware-compatibility `level` can be built on a GPU of this compute
    capability: ampere_plus needs sm_80 or newer, and neither level is supported on Jetson."""
    if level not in HARDWARE_LEVELS:
        raise ValueError(f"hardware_compatibility must be one of {HARDWARE_LEVELS}, got {level!r}")
    if level == "none":
        return
    if is_jetson(compute_capability):
        raise ValueError(f"hardware compatibility ({level}) is not supported by TensorRT on Jetson (compute "
                         f"capability {compute_capability}): build a plain engine on the device itself")
    if level == "ampere_plus" and _version_tuple(compute_capability)[:2] < (8, 0):
        raise ValueError(f"ampere_plus engines are built on Ampere or newer GPUs; this one is {compute_capability}")


def check_compatible(sidecar: dict[str, Any], *, tensorrt_version: str, gpu_name: str,
                     compute_capability: str, platform_here: dict[str, str] | None = None) -> list[str]:
    """Raise EngineCompatibilityError if this TensorRT, GPU and platform cannot run the engine; return
    warnings.

    TensorRT: a plain engine runs on exactly the TensorRT that built it (all four version fields); a
    version-compatible one on that version or a newer one of the same major or the next (TensorRT 11
    runs TensorRT 10 version-compatible engines). GPU: the same compute capability, or for an
    "ampere_plus" engine any compute capability >= 8.0 other than a Jetson's. Platform: the same
    operating system and CPU architecture. A different GPU name with the same compute capability runs,
    but may run slower than on the GPU it was tuned for: a warning.
    """
    built, here = sidecar["tensorrt_version"], tensorrt_version
    b, h = _version_tuple(built), _version_tuple(here)
    if sidecar.get("version_compatible"):
        if h < b or h[0] > b[0] + 1:
            raise EngineCompatibilityError(
                f"engine built with TensorRT {built} (version-compatible) cannot run on TensorRT {here}: it needs "
                f"TensorRT {built} or newer, up to {b[0] + 1}.x")
    elif h != b:
        raise EngineCompatibilityError(
            f"engine built with TensorRT {built} cannot run on TensorRT {here}: rebuild it here "
            "(or build it with --version-compatible)")
    built_on, platform_here = sidecar.get("platform"), platform_here or current_platform()
    if built_on and built_on != platform_here:
        raise EngineCompatibilityError(
            f"engine was built on {built_on['os']} {built_on['machine']}, this is {platform_here['os']} "
            f"{platform_here['machine']}: engines do not move across platforms; rebuild it here")
    gpu = sidecar["gpu"]
    level = sidecar.get("hardware_compatibility", "none")
    cc_built, cc_here = _version_tuple(gpu["compute_capability"])[:2], _version_tuple(compute_capability)[:2]
    if level == "ampere_plus":
        if cc_here < (8, 0) or is_jetson(compute_capability):
            raise EngineCompatibilityError(
                f"engine is hardware-compatible for Ampere and newer discrete GPUs (compute capability >= 8.0, "
                f"not Jetson); this GPU, {gpu_name}, is {compute_capability}")
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


# --- what the engine itself says about its inputs and outputs --------------------------------------------

# TensorRT DataType member names -> the names this file uses
TENSORRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "UINT8": "uint8", "INT8": "int8",
                   "INT32": "int32", "INT64": "int64", "BOOL": "bool"}


def describe_engine(engine) -> list[dict[str, Any]]:
    """The engine's I/O tensors as plain data: name, mode ("INPUT"/"OUTPUT"), dtype, shape, and for inputs
    the (min, opt, max) shapes of optimisation profile 0 (TensorRT 10/11 ICudaEngine API)."""
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = engine.get_tensor_mode(name).name
        tensor = {"name": name, "mode": mode, "dtype": TENSORRT_DTYPES.get(engine.get_tensor_dtype(name).name,
                                                                              engine.get_tensor_dtype(name).name),
                  "shape": [int(d) for d in engine.get_tensor_shape(name)]}
        if mode == "INPUT":
            tensor["profile"] = [[int(d) for d in s] for s in engine.get_tensor_profile_shape(name, 0)]
        tensors.append(tensor)
    return tensors


class EngineIO(NamedTuple):
    """What the runner needs from an engine, read from the engine itself."""

    input_name: str
    input_dtype: str  # "float32" or "uint8" (clips, frames); "float32" or "float16" (features)
    output_name: str
    output_dtype: str
    output_shape: tuple[int, ...]  # one row's
    min_batch: int
    opt_batch: int
    max_batch: int

    @property
    def pixels(self) -> bool:
        """Whether the input is pixels (clips or frames: uint8 and float in [0, 1] rescaled to each other)."""
        return self.input_name != GRAPHS["windows"][0]


def expected_io(sidecar: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (input, output) an engine with this sidecar must have: name, the dtypes an stt_fast engine of
    that graph may take and the one the sidecar names (None: any of them), one row's shape.
    The whole model's input may be float32 or uint8 (the sidecar may name which) and its shapes follow the
    sidecar's config; the halves' are exactly those the sidecar recorded from their ONNX files."""
    graph = sidecar.get("graph", "whole")
    if graph not in GRAPHS:
        raise EngineCompatibilityError(f"sidecar names graph {graph!r}; an stt_fast engine is one of {sorted(GRAPHS)}")
    if graph != "whole":
        inputs, outputs = sidecar["input"], sidecar["output"]
        return ({"name": inputs["name"], "dtypes": (inputs["dtype"],), "shape": list(inputs["shape"][1:])},
                {"name": outputs["name"], "dtypes": (outputs["dtype"],), "shape": list(outputs["shape"][1:])})
    config = sidecar.get("config") or {}
    return ({"name": INPUT_NAME, "dtypes": INPUT_DTYPES, "named": (sidecar.get("input") or {}).get("dtype"),
             "shape": [config.get("num_frames"), 3, config.get("image_size"), config.get("image_size")]},
            {"name": OUTPUT_NAME, "dtypes": ("float32",), "shape": [config.get("num_classes")]})


def engine_io(tensors: list[dict[str, Any]], sidecar: dict[str, Any]) -> EngineIO:
    """Check the engine's own I/O description (describe_engine) against what an stt_fast engine of the
    sidecar's graph must be and against the sidecar; EngineCompatibilityError names the first difference."""
    want_in, want_out = expected_io(sidecar)
    names = {t["name"]: t for t in tensors}
    if sorted(names) != sorted([want_in["name"], want_out["name"]]):
        raise EngineCompatibilityError(f"engine has I/O tensors {sorted(names)}, an stt_fast engine has exactly "
                                       f"'{want_in['name']}' (input) and '{want_out['name']}' (output)")
    got_in, got_out = names[want_in["name"]], names[want_out["name"]]
    problems = []
    if got_in["mode"] != "INPUT" or got_out["mode"] != "OUTPUT":
        problems.append(f"'{got_in['name']}' is {got_in['mode']} and '{got_out['name']}' is {got_out['mode']}")
    for role, got, want in (("input", got_in, want_in), ("output", got_out, want_out)):
        if got["dtype"] not in want["dtypes"]:
            problems.append(f"{role} dtype {got['dtype']} is not one of {tuple(want['dtypes'])}")
        elif want.get("named") not in (None, got["dtype"]):
            problems.append(f"{role} dtype {got['dtype']} differs from the sidecar's {want['named']}")
        if got["shape"][1:] != want["shape"]:
            problems.append(f"{role} shape {got['shape']} is not [-1, {', '.join(map(str, want['shape']))}] "
                            "(the sidecar's)")
    profile = got_in.get("profile") or [[0], [0], [0]]
    batch = [int(shape[0]) for shape in profile]
    side = sidecar.get("profile") or {}
    if [side.get("min"), side.get("opt"), side.get("max")] != batch:
        problems.append(f"profile batch {batch[0]}:{batch[1]}:{batch[2]} differs from the sidecar's "
                        f"{side.get('min')}:{side.get('opt')}:{side.get('max')}")
    if problems:
        raise EngineCompatibilityError("engine and sidecar disagree: " + "; ".join(problems))
    return EngineIO(got_in["name"], got_in["dtype"], got_out["name"], got_out["dtype"],
                    tuple(int(d) for d in got_out["shape"][1:]), *batch)


# --- clips in, in the engine's dtype and profile ------------------------------------------------------------

FEATURE_DTYPES = ("float32", "float16")


def engine_input(clips, input_dtype: str, *, pixels: bool = True):
    """clips (numpy array or torch tensor, [B, T, 3, H, W]; frames [F, 3, H, W] alike) in the engine's input
    dtype, rescaled: a uint8 engine takes round(x * 255) of float clips in [0, 1]; a float32 engine takes
    uint8 clips / 255. Float clips to a float engine and uint8 to a uint8 engine pass as they are (other
    float widths become float32); any other dtype is refused.
    pixels=False (the windows half's features [B, T*N, C]): floating point cast to the engine's float32 or
    float16, never rescaled."""
    if not pixels:
        if input_dtype not in FEATURE_DTYPES:
            raise ValueError(f"a features engine takes one of {FEATURE_DTYPES}, not {input_dtype!r}")
        if type(clips).__module__.startswith("torch"):
            if not clips.is_floating_point():
                raise ValueError(f"features must be floating point, got {clips.dtype}")
            import torch

            return clips.to(getattr(torch, input_dtype))
        import numpy as np

        clips = np.asarray(clips)
        if not np.issubdtype(clips.dtype, np.floating):
            raise ValueError(f"features must be floating point, got {clips.dtype}")
        return clips.astype(input_dtype, copy=False)
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"engine input dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
    if type(clips).__module__.startswith("torch"):
        import torch

        is_uint8, is_float = clips.dtype == torch.uint8, clips.is_floating_point()
        _check_clip_dtype(is_uint8, is_float, clips.dtype)
        if input_dtype == "uint8":
            return clips if is_uint8 else (clips.float() * 255).round().clamp(0, 255).to(torch.uint8)
        return clips.float() / 255 if is_uint8 else clips.float()
    import numpy as np

    clips = np.asarray(clips)
    is_uint8, is_float = clips.dtype == np.uint8, np.issubdtype(clips.dtype, np.floating)
    _check_clip_dtype(is_uint8, is_float, clips.dtype)
    if input_dtype == "uint8":
        return clips if is_uint8 else np.clip(np.rint(clips.astype(np.float32) * 255), 0, 255).astype(np.uint8)
    return clips.astype(np.float32) / np.float32(255) if is_uint8 else clips.astype(np.float32)


def _check_clip_dtype(is_uint8: bool, is_float: bool, dtype) -> None:
    if not (is_uint8 or is_float):
        raise ValueError(f"clips must be uint8 (0-255) or floating point (in [0, 1]), got {dtype}")


def profile_chunks(batch: int, min_batch: int, max_batch: int) -> list[tuple[int, int, int]]:
    """(start, stop, run_size) per engine call for a batch of `batch` clips: chunks of at most max_batch,
    each run at least min_batch large (a short chunk is padded up to the profile's minimum, and its
    extra rows are dropped)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not 1 <= min_batch <= max_batch:
        raise ValueError(f"profile must satisfy 1 <= min <= max, got {min_batch}:{max_batch}")
    return [(start, min(batch, start + max_batch), max(min_batch, min(batch, start + max_batch) - start))
            for start in range(0, batch, max_batch)]


def pad_rows(chunk, size: int):
    """chunk [b, ...] -> [size, ...] by repeating its last row (numpy or torch; size >= b)."""
    extra = size - chunk.shape[0]
    if extra <= 0:
        return chunk
    last = chunk[-1:]
    if type(chunk).__module__.startswith("torch"):
        import torch

        return torch.cat([chunk, last.expand(extra, *chunk.shape[1:])])
    import numpy as np

    return np.concatenate([chunk, np.repeat(last, extra, axis=0)])


def run_in_chunks(clips, io: EngineIO, run_chunk: Callable, concat: Callable):
    """logits of clips through run_chunk(padded chunk) -> logits of the padded chunk, chunked and padded to
    the engine's profile (profile_chunks), extra rows dropped."""
    parts = [run_chunk(pad_rows(clips[start:stop], size))[:stop - start]
             for start, stop, size in profile_chunks(clips.shape[0], io.min_batch, io.max_batch)]
    return parts[0] if len(parts) == 1 else concat(parts)


def _enqueue(context, shape, input_address: int, output_address: int, stream: int, io: EngineIO) -> None:
    """Bind one call's shapes and addresses and enqueue it; every TensorRT refusal raises, naming why."""
    if not context.set_input_shape(io.input_name, tuple(shape)):
        raise RuntimeError(f"TensorRT refused input shape {tuple(shape)}: the engine's profile takes batch "
                           f"{io.min_batch} to {io.max_batch}")
    context.set_tensor_address(io.input_name, input_address)
    context.set_tensor_address(io.output_name, output_address)
    if not context.execute_async_v3(stream):
        raise RuntimeError("TensorRT execution failed (execute_async_v3 returned False; see its log above)")


# --- device memory ------------------------------------------------------------------------------------------

class GrowingAllocation:
    """One allocation from a binding's alloc/free, grown to the largest size asked for and reused. A failed
    alloc leaves it empty (never a freed pointer with the old capacity)."""

    def __init__(self, alloc: Callable[[int], Any], free: Callable[[Any], None]) -> None:
        self._alloc, self._free = alloc, free
        self.handle: Any = None
        self.nbytes = 0

    def ensure(self, nbytes: int):
        if self.handle is None or nbytes > self.nbytes:
            self.release()
            self.handle = self._alloc(nbytes)
            self.nbytes = nbytes
        return self.handle

    def release(self) -> None:
        handle, self.handle, self.nbytes = self.handle, None, 0
        if handle is not None:
            self._free(handle)


class _TorchBuffers:
    """torch CUDA tensors as the engine's buffers, enqueued on the device's current torch stream."""

    def __init__(self, device: int) -> None:
        import torch

        self.torch = torch
        self.device = torch.device("cuda", device)

    def activate(self):
        return self.torch.cuda.device(self.device)

    def run(self, context, clips, io: EngineIO):
        torch = self.torch
        clips = torch.as_tensor(clips).to(self.device).contiguous()
        out = torch.empty((clips.shape[0], *io.output_shape), dtype=getattr(torch, io.output_dtype),
                          device=self.device)
        _enqueue(context, clips.shape, clips.data_ptr(), out.data_ptr(),
                 torch.cuda.current_stream(self.device).cuda_stream, io)
        return out

    def concat(self, parts):
        return self.torch.cat(parts)

    def close(self) -> None:
        pass  # torch's allocator owns the memory


class _PyCudaBuffers:
    """numpy in, numpy out; device and page-locked host memory and a stream from pycuda (no PyTorch)."""

    def __init__(self, device: int) -> None:
        import numpy as np
        import pycuda.driver as cuda

        cuda.init()
        self.np, self.cuda = np, cuda
        self.context = cuda.Device(device).retain_primary_context()
        with self.activate():
            self.stream = cuda.Stream()
        self._device = [GrowingAllocation(cuda.mem_alloc, lambda a: a.free()) for _ in range(2)]
        self._host = [GrowingAllocation(lambda n: cuda.pagelocked_empty(n, np.uint8), lambda a: None)
                      for _ in range(2)]

    @contextlib.contextmanager
    def activate(self):
        self.context.push()
        try:
            yield
        finally:
            self.context.pop()

    def run(self, context, clips, io: EngineIO):
        np, cuda = self.np, self.cuda
        out_shape, out_dtype = (clips.shape[0], *io.output_shape), np.dtype(io.output_dtype)
        out_bytes = int(np.prod(out_shape)) * out_dtype.itemsize
        host_in = self._host[0].ensure(clips.nbytes)[:clips.nbytes].view(clips.dtype).reshape(clips.shape)
        host_in[...] = clips  # page-locked, so that the copy below is asynchronous
        host_out = self._host[1].ensure(out_bytes)[:out_bytes].view(out_dtype).reshape(out_shape)
        d_in, d_out = self._device[0].ensure(clips.nbytes), self._device[1].ensure(out_bytes)
        cuda.memcpy_htod_async(d_in, host_in, self.stream)
        _enqueue(context, clips.shape, int(d_in), int(d_out), self.stream.handle, io)
        cuda.memcpy_dtoh_async(host_out, d_out, self.stream)
        self.stream.synchronize()
        return host_out.copy()

    def concat(self, parts):
        return self.np.concatenate(parts)

    def close(self) -> None:
        with self.activate():
            for allocation in (*self._device, *self._host):
                allocation.release()


def _cuda_check(result, what: str):
    """cuda-python returns (error, *values): raise on an error, return the value(s)."""
    from cuda.bindings import runtime as cudart

    error, *values = result
    if error != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"{what} failed: {error.name} (is there a CUDA GPU and driver?)")
    return values[0] if len(values) == 1 else tuple(values) if values else None


class _CudaRuntimeBuffers:
    """numpy in, numpy out; device memory, page-locked host memory and a stream from NVIDIA's cuda-python
    (cuda.bindings.runtime), which installs as wheels where pycuda has to be compiled."""

    def __init__(self, device: int) -> None:
        import numpy as np
        from cuda.bindings import runtime as cudart

        self.np, self.cudart, self.device = np, cudart, device
        _cuda_check(cudart.cudaSetDevice(device), "cudaSetDevice")
        self.stream = _cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._device = [GrowingAllocation(lambda n: _cuda_check(cudart.cudaMalloc(n), "cudaMalloc"),
                                          lambda p: _cuda_check(cudart.cudaFree(p), "cudaFree")) for _ in range(2)]
        self._host = [GrowingAllocation(lambda n: _cuda_check(cudart.cudaMallocHost(n), "cudaMallocHost"),
                                        lambda p: _cuda_check(cudart.cudaFreeHost(p), "cudaFreeHost"))
                      for _ in range(2)]

    @contextlib.contextmanager
    def activate(self):
        _cuda_check(self.cudart.cudaSetDevice(self.device), "cudaSetDevice")  # per host thread
        yield

    def _host_array(self, allocation: GrowingAllocation, shape, dtype):
        import ctypes

        nbytes = int(self.np.prod(shape)) * self.np.dtype(dtype).itemsize
        pointer = int(allocation.ensure(nbytes))
        raw = (ctypes.c_uint8 * nbytes).from_address(pointer)
        return self.np.frombuffer(raw, dtype=self.np.uint8).view(dtype).reshape(shape)

    def run(self, context, clips, io: EngineIO):
        np, cudart = self.np, self.cudart
        out_shape = (clips.shape[0], *io.output_shape)
        host_in = self._host_array(self._host[0], clips.shape, clips.dtype)
        host_in[...] = clips  # page-locked, so that the copies below are asynchronous
        host_out = self._host_array(self._host[1], out_shape, np.dtype(io.output_dtype))
        d_in, d_out = self._device[0].ensure(host_in.nbytes), self._device[1].ensure(host_out.nbytes)
        kind = cudart.cudaMemcpyKind
        _cuda_check(cudart.cudaMemcpyAsync(d_in, host_in.ctypes.data, host_in.nbytes,
                                           kind.cudaMemcpyHostToDevice, self.stream), "cudaMemcpyAsync")
        _enqueue(context, clips.shape, int(d_in), int(d_out), int(self.stream), io)
        _cuda_check(cudart.cudaMemcpyAsync(host_out.ctypes.data, d_out, host_out.nbytes,
                                           kind.cudaMemcpyDeviceToHost, self.stream), "cudaMemcpyAsync")
        _cuda_check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return host_out.copy()

    def concat(self, parts):
        return self.np.concatenate(parts)

    def close(self) -> None:
        with self.activate():
            for allocation in (*self._device, *self._host):
                allocation.release()
            if self.stream is not None:
                stream, self.stream = self.stream, None
                _cuda_check(self.cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")


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


def deserialize(trt, engine_bytes: bytes, *, host_code_allowed: bool):
    """(runtime, engine or None): a version-compatible plan carries its lean runtime as host code, which
    the full runtime runs only when allowed."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    if host_code_allowed:
        runtime.engine_host_code_allowed = True
    return runtime, runtime.deserialize_cuda_engine(engine_bytes)


class EngineRunner:
    """Load a checked engine and run it: clips [B, T, 3, H, W] -> logits [B, K] float32 (and for the
    timeline's two halves: frames [F, 3, H, W] -> features [F, N, C]; features [B, T*N, C] -> logits).

    buffers="torch": inputs are anything torch.as_tensor takes, logits a CUDA tensor.
    buffers="cuda-python" or "pycuda": inputs are numpy arrays, logits a numpy array (no PyTorch).
    Clips may be float in [0, 1] or uint8 whatever the engine takes: they are rescaled to its input dtype
    (engine_input). Batches above the profile's maximum run in chunks, batches below its minimum padded.
    The I/O dtypes, number of classes and profile are read from the engine and checked against the
    sidecar. One execution context and one set of buffers serve every call: calls are serialised by a
    lock, so a runner may be shared between threads (one call at a time; give each thread its own runner
    to run them concurrently). close() frees the buffers (also on garbage collection).
    """

    def __init__(self, engine_path: str | os.PathLike, *, buffers: str = "torch", device: int = 0,
                 engine_bytes: bytes | None = None, sidecar: dict[str, Any] | None = None) -> None:
        if buffers not in BUFFERS:
            raise ValueError(f"buffers must be one of {sorted(BUFFERS)}, got {buffers!r}")
        self.path = Path(engine_path)
        self.buffers = None
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
        # TensorRT works on the current CUDA device: the buffers make `device` current around
        # deserialisation, context creation and every call.
        self.buffers = BUFFERS[buffers](device)
        with self.buffers.activate():
            self._runtime, self.engine = deserialize(trt, engine_bytes,
                                                     host_code_allowed=bool(self.sidecar.get("version_compatible")))
            if self.engine is None:
                raise EngineCompatibilityError(f"TensorRT could not deserialize {self.path} (see its log above)")
            self.io = engine_io(describe_engine(self.engine), self.sidecar)
            self.context = self.engine.create_execution_context()
        self._lock = threading.Lock()

    @property
    def input_dtype(self) -> str:
        return self.io.input_dtype

    @property
    def max_batch(self) -> int:
        return self.io.max_batch

    def __call__(self, clips):
        clips = engine_input(clips, self.io.input_dtype, pixels=self.io.pixels)
        with self._lock, self.buffers.activate():
            return run_in_chunks(clips, self.io, lambda chunk: self.buffers.run(self.context, chunk, self.io),
                                 self.buffers.concat)

    def close(self) -> None:
        if self.buffers is not None:
            buffers, self.buffers = self.buffers, None
            buffers.close()

    def __enter__(self) -> EngineRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: the bindings may be gone already
            self.close()


def _sidecar_for_existing_engine(args) -> int:
    """For an engine built elsewhere (trtexec): its sidecar from the ONNX file it was built from and from
    what the engine itself says (I/O, profile, hardware compatibility; version compatibility by whether
    it deserialises only with host code allowed, or --version-compatible)."""
    import onnx

    engine = Path(args.engine)
    if not engine.is_file():
        raise FileNotFoundError(f"engine not found: {engine}")
    model = onnx.load(args.onnx, load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    trt = import_tensorrt()
    name, capability = current_gpu(args.device, args.buffers)
    engine_bytes = engine.read_bytes()
    buffers = BUFFERS[args.buffers](args.device)
    try:
        with buffers.activate():
            version_compatible = args.version_compatible
            _, plan = deserialize(trt, engine_bytes, host_code_allowed=version_compatible)
            if plan is None and not version_compatible:
                _, plan = deserialize(trt, engine_bytes, host_code_allowed=True)
                version_compatible = plan is not None
            if plan is None:
                raise EngineCompatibilityError(f"TensorRT {trt.__version__} could not deserialize {engine}")
            tensors = describe_engine(plan)
            level_name = plan.hardware_compatibility_level.name
    finally:
        buffers.close()
    level = str(level_name).lower()
    input_name = declared_io(meta)[1]["name"]
    clips = next((t for t in tensors if t["name"] == input_name), None)
    if clips is None or "profile" not in clips:
        raise EngineCompatibilityError(f"{engine} has no input '{input_name}': not built from an stt_fast ONNX file")
    batch = tuple(int(shape[0]) for shape in clips["profile"])
    sidecar = make_sidecar(engine_bytes=engine_bytes, onnx_meta=meta, onnx_file=Path(args.onnx).name,
                           onnx_sha256=hashlib.sha256(Path(args.onnx).read_bytes()).hexdigest(),
                           tensorrt_version=trt.__version__, gpu={"name": name, "compute_capability": capability},
                           batch=batch, version_compatible=version_compatible,
                           hardware_compatibility=level if level in HARDWARE_LEVELS else "none",
                           builder={"tool": "external (trtexec)"})
    engine_io(tensors, sidecar)  # the ONNX file's config must match the engine's shapes
    print(f"wrote {write_sidecar(engine, sidecar)} (profile {batch[0]}:{batch[1]}:{batch[2]}, "
          f"version-compatible {version_compatible}, hardware compatibility {sidecar['hardware_compatibility']})")
    return 0


def _run(args) -> int:
    import numpy as np

    with EngineRunner(args.engine, buffers=args.buffers, device=args.device) as runner:
        if runner.sidecar.get("graph", "whole") != "whole":
            raise ValueError(f"{args.engine} is the timeline's {runner.sidecar['graph']!r} half, not a whole model: "
                             "'run' takes an engine built from model.onnx")
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
    run.add_argument("--clips", required=True,
                     help=".npy array [B, T, 3, H, W], float in [0, 1] or uint8 0-255 (rescaled to the engine's input)")
    run.add_argument("--buffers", default=default_buffers(), choices=sorted(BUFFERS),
                     help="device memory from cuda-python, pycuda or torch (default: cuda-python where installed)")
    run.add_argument("--device", type=int, default=0, help="CUDA device index (default: 0)")
    run.set_defaults(func=_run)
    side = sub.add_parser("sidecar", help="write the sidecar of an engine built with trtexec")
    side.add_argument("engine")
    side.add_argument("--onnx", required=True, help="the stt_fast ONNX file the engine was built from")
    side.add_argument("--version-compatible", action="store_true",
                      help="the engine was built with trtexec --versionCompatible (detected when not given)")
    side.add_argument("--device", type=int, default=0, help="CUDA device index (default: 0)")
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
