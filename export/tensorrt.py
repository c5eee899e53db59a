"""Build a TensorRT engine from an exported ONNX file (TensorRT 10.x and 11.x Python APIs).

- Strongly typed network from the ONNX parser: the graph's types decide each layer's precision, so
  the FP16 graph (export/onnx_export.py) gives an FP16 engine with LayerNorm, softmax and logits in
  float32. TensorRT 11 removed BuilderFlag.FP16; in 10.x the STRONGLY_TYPED creation flag asks for the
  same behaviour, and 11.x keeps that flag as an ignored no-op, so one code path serves both.
- One optimisation profile over the batch dimension (min/opt/max), a workspace limit, the builder
  optimisation level, a timing cache loaded and saved, optional version-compatible and
  hardware-compatible ("ampere_plus") engines.
- Progress shown through IProgressMonitor (TensorRT 10.0 and newer).
- The engine and its JSON sidecar (engine_runtime.py) written atomically; the sidecar holds the
  TensorRT version, GPU, precision, profile, hashes of the checkpoint, ONNX file and engine, the build
  time, and the engine's accuracy against the reference model measured right after the build.

VERIFIED WHERE: written against the documented TensorRT 10.x / 11.x Python APIs. TensorRT could not be
installed on the machines this project was developed and tested on, so this module has not run; its
tests skip with that reason where TensorRT or a GPU is missing.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from stt_fast.accuracy import ParityReport, compare_logits, tolerance
from stt_fast.compiler.validation import reference_logits
from stt_fast.files import sha256_file, write_bytes_atomic
from stt_fast.model import STT

from .engine_runtime import HARDWARE_LEVELS, INPUT_NAME, EngineRunner, import_tensorrt, make_sidecar, write_sidecar
from .onnx_export import PRECISION_DTYPES, BatchRange, config_from_metadata, load_onnx, read_metadata
from .parity import probe_inputs


def _progress_monitor(trt):
    """An IProgressMonitor printing each top-level phase's progress, or None before TensorRT 10."""
    if not hasattr(trt, "IProgressMonitor"):
        return None
    from tqdm import tqdm

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._bars: dict[str, Any] = {}
            self._lock = threading.Lock()  # TensorRT may report from several threads

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                self._bars[phase_name] = tqdm(total=num_steps, desc=f"[build] {phase_name}", leave=parent_phase is None,
                                              position=len(self._bars), unit="step")

        def step_complete(self, phase_name, step):
            with self._lock:
                bar = self._bars.get(phase_name)
                if bar is not None:
                    bar.update(step + 1 - bar.n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            with self._lock:
                bar = self._bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()

    return Monitor()


def _gpu(device: int) -> dict[str, str]:
    if not torch.cuda.is_available():
        raise RuntimeError("building a TensorRT engine needs a CUDA GPU; none is available")
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, batch: BatchRange | None = None,
                 workspace_gib: float = 4.0, optimization_level: int = 3,
                 timing_cache: str | os.PathLike | None = None, version_compatible: bool = False,
                 hardware_compatibility: str = "none", reference_model=None, device: int = 0,
                 progress: bool = True) -> dict[str, Any]:
    """Build onnx_path into engine_path (+ sidecar) and return the sidecar.

    batch: the optimisation profile (default: the range recorded in the ONNX file at export).
    reference_model: the STT the ONNX file came from; when given, the engine's logits are compared
        with it on probe clips right after the build and the result goes into the sidecar.
    """
    trt = import_tensorrt()
    if hardware_compatibility not in HARDWARE_LEVELS:
        raise ValueError(f"hardware_compatibility must be one of {HARDWARE_LEVELS}, got {hardware_compatibility!r}")
    if not 0 <= optimization_level <= 5:
        raise ValueError(f"optimization_level must be in 0..5, got {optimization_level}")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    onnx_model = load_onnx(onnx_path)
    meta = read_metadata(onnx_model)
    config = config_from_metadata(meta)
    batch = batch or BatchRange.parse(meta.get("stt_fast.batch", "1:8:64"))
    gpu = _gpu(device)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # required on 10.x, accepted and ignored on 11.x
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")

    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    builder_config.builder_optimization_level = optimization_level
    shape = (config.num_frames, 3, config.image_size, config.image_size)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (batch.min, *shape), (batch.opt, *shape), (batch.max, *shape))
    builder_config.add_optimization_profile(profile)
    if version_compatible:
        builder_config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if hardware_compatibility == "ampere_plus":
        builder_config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    cache_blob = b""
    if timing_cache is not None and Path(timing_cache).is_file():
        cache_blob = Path(timing_cache).read_bytes()
    cache = builder_config.create_timing_cache(cache_blob)
    builder_config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _progress_monitor(trt) if progress else None
    if monitor is not None:
        builder_config.progress_monitor = monitor

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, builder_config)
    build_seconds = time.perf_counter() - start
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    engine_bytes = bytes(memoryview(serialized))
    if timing_cache is not None:
        write_bytes_atomic(timing_cache, bytes(memoryview(cache.serialize())))

    sidecar = make_sidecar(engine_bytes=engine_bytes, onnx_meta=meta, onnx_file=onnx_path.name,
                           onnx_sha256=sha256_file(onnx_path), tensorrt_version=trt.__version__, gpu=gpu,
                           batch=(batch.min, batch.opt, batch.max), version_compatible=version_compatible,
                           hardware_compatibility=hardware_compatibility,
                           builder={"optimization_level": optimization_level, "workspace_gib": workspace_gib},
                           build_seconds=build_seconds)
    if reference_model is not None:
        runner = EngineRunner(engine_path, buffers="torch", device=device, engine_bytes=engine_bytes, sidecar=sidecar)
        sidecar["accuracy"] = engine_vs_reference(runner, reference_model).to_dict()
    # Engine first, then its sidecar: a reader finding a sidecar whose hash does not match refuses it.
    write_bytes_atomic(engine_path, engine_bytes)
    write_sidecar(engine_path, sidecar)
    return sidecar


def engine_vs_reference(runner: EngineRunner, model: STT, batch_sizes=(1, 5), seed: int = 0) -> ParityReport:
    """The engine's logits against the float32 reference on probe clips."""
    sizes = [min(b, runner.max_batch) for b in batch_sizes]
    probes = probe_inputs(model, sizes, runner.input_dtype, seed)
    outs = [torch.as_tensor(runner(p)).cpu().float() for p in probes]
    refs = [reference_logits(model, p) for p in probes]
    tol = tolerance(PRECISION_DTYPES[runner.sidecar.get("precision", "fp32")]).model
    return compare_logits("the float32 reference model", outs, refs, tol, sizes)
