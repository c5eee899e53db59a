"""Build a TensorRT engine from an exported ONNX file (TensorRT 10.x and 11.x Python APIs).

- Strongly typed network from the ONNX parser: the graph's types decide each layer's precision, so
  the FP16 graph (export/onnx_export.py) gives an FP16 engine with LayerNorm, softmax and logits in
  float32. TensorRT 11 removed BuilderFlag.FP16; in 10.x the STRONGLY_TYPED creation flag asks for the
  same behaviour, and 11.x keeps that flag as an ignored no-op, so one code path serves both.
- One optimisation profile over the batch dimension (min/opt/max), a workspace limit, the builder
  optimisation level, a timing cache per (TensorRT version, GPU, flags) loaded and saved, optional
  version-compatible and hardware-compatible ("ampere_plus", "same_compute_capability") engines; TF32
  off for float32 engines; detailed profiling verbosity, so that the engine inspector's per-layer
  information (kernels, precisions, what was fused) is written beside the engine as ENGINE.layers.json.
- Progress shown through IProgressMonitor (TensorRT 10.0 and newer).
- The engine and its JSON sidecar (engine_runtime.py) written atomically; the sidecar holds the
  TensorRT version, GPU, precision, profile, hashes of the checkpoint, ONNX file and engine, the build
  time, and the engine's accuracy against the reference model measured right after the build.

VERIFIED WHERE: written against the documented TensorRT 10.x / 11.x Python APIs. TensorRT could not be
installed on the machines this project was developed and tested on, so this module has not run; its
tests skip with that reason where TensorRT or a GPU is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from stt_fast.accuracy import ParityReport, compare_logits, tolerance
from stt_fast.compiler.validation import reference_logits
from stt_fast.files import sha256_file, write_bytes_atomic, write_text_atomic
from stt_fast.model import STT

from .engine_runtime import EngineRunner, declared_io, import_tensorrt, layers_path, make_sidecar, write_sidecar
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


# TensorRT's ONNX parser maps the opset-23 Attention op from 10.14 on (TensorRT 10.14 release notes).
ATTENTION_OP_MIN_TENSORRT = (10, 14)


def builder_settings(*, precision: str, attention_op: bool, version_compatible: bool, hardware_compatibility: str,
                     tensorrt_version: str, compute_capability: str) -> dict[str, Any]:
    """What build_engine asks of TensorRT's builder, decided without TensorRT (tested on the CPU):

    clear_flags / set_flags: BuilderFlag names. A float32 engine clears TF32, which TensorRT enables by
        default on Ampere and newer and which costs ~1e-3 of relative error (float32's tolerance is 1e-4).
    hardware_level: the HardwareCompatibilityLevel member name, or None for a plain engine.
    profiling_verbosity: DETAILED, so that the engine inspector reports each layer's kernel and precision.
    ValueError for what cannot be built: the Attention-op graph before TensorRT 10.14, a hardware-compatible
    engine on Jetson or (ampere_plus) before Ampere.
    """
    from .engine_runtime import _version_tuple, check_hardware_level

    if attention_op and _version_tuple(tensorrt_version)[:2] < ATTENTION_OP_MIN_TENSORRT:
        raise ValueError(f"this ONNX file uses the ONNX Attention op (exported with --attention-op), which "
                         f"TensorRT's parser reads from {'.'.join(map(str, ATTENTION_OP_MIN_TENSORRT))} on; this is "
                         f"TensorRT {tensorrt_version}: export without --attention-op")
    check_hardware_level(hardware_compatibility, compute_capability)
    return {"clear_flags": ["TF32"] if precision == "fp32" else [],
            "set_flags": ["VERSION_COMPATIBLE"] if version_compatible else [],
            "hardware_level": None if hardware_compatibility == "none" else hardware_compatibility.upper(),
            "profiling_verbosity": "DETAILED"}


def timing_cache_path(root: str | os.PathLike, *, tensorrt_version: str, gpu: dict[str, str],
                      settings: dict[str, Any]) -> Path:
    """The timing cache for one (TensorRT version, GPU, builder flags): TensorRT documents its timing
    cache as specific to all three, so one file is never shared across them."""
    text = json.dumps([tensorrt_version, gpu["name"], gpu["compute_capability"], settings], sort_keys=True)
    return Path(root) / f"timing-{hashlib.sha256(text.encode()).hexdigest()[:16]}.cache"


def layer_summary(information: str) -> dict[str, Any]:
    """A short reading of the engine inspector's JSON (LayerInformationFormat.JSON): how many layers, and
    the names of those that look like fused attention (TensorRT names them after their mha/fmha kernels).
    With DETAILED verbosity each layer is an object with a "Name"; otherwise it is the name itself."""
    layers = json.loads(information).get("Layers", [])
    names = [layer.get("Name", "") if isinstance(layer, dict) else str(layer) for layer in layers]
    attention = [n for n in names if re.search(r"mha|fmha|attention", n, re.IGNORECASE)]
    return {"layers": len(names), "attention_layers": attention}


def profile_shapes(onnx_meta: dict[str, str], batch: BatchRange) -> tuple[str, tuple, tuple, tuple]:
    """(input name, min, opt, max shapes) of the optimisation profile for the graph an stt_fast ONNX file
    holds (the whole model, or one of the timeline's halves): its batch dimension over `batch`."""
    _, inputs, _ = declared_io(onnx_meta)
    row = tuple(int(d) for d in inputs["shape"][1:])
    return inputs["name"], (batch.min, *row), (batch.opt, *row), (batch.max, *row)


def _apply_settings(trt, builder_config, settings: dict[str, Any]) -> None:
    for name in settings["clear_flags"]:
        builder_config.clear_flag(getattr(trt.BuilderFlag, name))
    for name in settings["set_flags"]:
        builder_config.set_flag(getattr(trt.BuilderFlag, name))
    if settings["hardware_level"] is not None:
        level = getattr(trt.HardwareCompatibilityLevel, settings["hardware_level"], None)
        if level is None:
            raise ValueError(f"TensorRT {trt.__version__} has no hardware compatibility level "
                             f"{settings['hardware_level']} (added after 10.3)")
        builder_config.hardware_compatibility_level = level
    builder_config.profiling_verbosity = getattr(trt.ProfilingVerbosity, settings["profiling_verbosity"])


def _timing_cache(builder_config, path: Path | None):
    """The builder's timing cache, loaded from path where it holds one; a cache TensorRT refuses is
    replaced by an empty one (and rewritten after the build), with a warning."""
    blob = path.read_bytes() if path is not None and path.is_file() else b""
    cache = builder_config.create_timing_cache(blob)
    if not builder_config.set_timing_cache(cache, ignore_mismatch=False):
        print(f"[build] warning: TensorRT refused the timing cache {path}; starting an empty one", file=sys.stderr)
        cache = builder_config.create_timing_cache(b"")
        if not builder_config.set_timing_cache(cache, ignore_mismatch=False):
            raise RuntimeError("TensorRT refused an empty timing cache")
    return cache


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, batch: BatchRange | None = None,
                 workspace_gib: float = 4.0, optimization_level: int = 3,
                 timing_cache: str | os.PathLike | None = None, version_compatible: bool = False,
                 hardware_compatibility: str = "none", reference_model=None, device: int = 0,
                 progress: bool = True) -> dict[str, Any]:
    """Build onnx_path into engine_path (+ sidecar, + the inspector's layer information) on CUDA device
    `device` and return the sidecar.

    batch: the optimisation profile (default: the range recorded in the ONNX file at export).
    timing_cache: a folder; the cache file in it is keyed by TensorRT version, GPU and flags.
    reference_model: the STT the ONNX file came from; when given, the engine's logits are compared
        with it on probe clips right after the build and the result goes into the sidecar.
    """
    trt = import_tensorrt()
    if not 0 <= optimization_level <= 5:
        raise ValueError(f"optimization_level must be in 0..5, got {optimization_level}")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    onnx_model = load_onnx(onnx_path)
    meta = read_metadata(onnx_model)
    config_from_metadata(meta)  # refuses a file stt_fast did not export, naming it
    batch = batch or BatchRange.parse(meta.get("stt_fast.batch", "1:8:64"))
    gpu = _gpu(device)
    precision = meta.get("stt_fast.precision", "fp32")
    settings = builder_settings(precision=precision, attention_op=meta.get("stt_fast.attention_op") == "true",
                                version_compatible=version_compatible, hardware_compatibility=hardware_compatibility,
                                tensorrt_version=trt.__version__, compute_capability=gpu["compute_capability"])
    cache_file = None if timing_cache is None else timing_cache_path(timing_cache, tensorrt_version=trt.__version__,
                                                                     gpu=gpu, settings=settings)

    with torch.cuda.device(device):  # TensorRT builds on the current CUDA device
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
        profile = builder.create_optimization_profile()
        profile.set_shape(*profile_shapes(meta, batch))
        builder_config.add_optimization_profile(profile)
        _apply_settings(trt, builder_config, settings)
        cache = _timing_cache(builder_config, cache_file)
        monitor = _progress_monitor(trt) if progress else None
        if monitor is not None:
            builder_config.progress_monitor = monitor

        start = time.perf_counter()
        serialized = builder.build_serialized_network(network, builder_config)
        build_seconds = time.perf_counter() - start
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
        engine_bytes = bytes(memoryview(serialized))
        if cache_file is not None:
            write_bytes_atomic(cache_file, bytes(memoryview(cache.serialize())))

    sidecar = make_sidecar(engine_bytes=engine_bytes, onnx_meta=meta, onnx_file=onnx_path.name,
                           onnx_sha256=sha256_file(onnx_path), tensorrt_version=trt.__version__, gpu=gpu,
                           batch=(batch.min, batch.opt, batch.max), version_compatible=version_compatible,
                           hardware_compatibility=hardware_compatibility,
                           builder={"optimization_level": optimization_level, "workspace_gib": workspace_gib,
                                    **settings},
                           build_seconds=build_seconds)
    # The built engine is loaded once, as the runner will load it: its own I/O is checked against the
    # sidecar, its layers are recorded, and (with a reference) its accuracy measured.
    with EngineRunner(engine_path, buffers="torch", device=device, engine_bytes=engine_bytes,
                      sidecar=sidecar) as runner:
        inspector = runner.engine.create_engine_inspector()
        information = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        sidecar["layers"] = layer_summary(information)
        if reference_model is not None:
            sidecar["accuracy"] = engine_vs_reference(runner, reference_model).to_dict()
    # Engine first, then its sidecar: a reader finding a sidecar whose hash does not match refuses it.
    write_bytes_atomic(engine_path, engine_bytes)
    write_text_atomic(layers_path(engine_path), information)
    write_sidecar(engine_path, sidecar)
    return sidecar


def engine_vs_reference(runner: EngineRunner, model: STT, batch_sizes=(1, 5), seed: int = 0) -> ParityReport:
    """The engine's logits against the float32 reference on probe clips, given both as float clips in
    [0, 1] and as uint8 clips whatever the engine's input dtype, so that the runner's rescaling is part of
    what is checked. Batch 1 is below a profile minimum > 1 on purpose (the runner pads it)."""
    sizes = [min(b, runner.max_batch) for b in batch_sizes]
    probes = [p for dtype in ("float32", "uint8") for p in probe_inputs(model, sizes, dtype, seed)]
    outs = [torch.as_tensor(runner(p)).cpu().float() for p in probes]
    refs = [reference_logits(model, p) for p in probes]
    tol = tolerance(PRECISION_DTYPES[runner.sidecar.get("precision", "fp32")]).model
    return compare_logits("the float32 reference model (float and uint8 clips)", outs, refs, tol, sizes + sizes)
