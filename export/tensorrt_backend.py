"""stt_fast.compile(model, backend="tensorrt"): an FP16 TensorRT engine behind the reference's call.

The engine is built once and cached under cache_dir (default ~/.cache/stt_fast/engines), keyed by
the weights' fingerprint, the config, the precision, the batch profile, the TensorRT version, the GPU
and the stt_fast version; a later compile of the same model on the same machine reuses it, once its
sidecar, hash and compatibility have been checked (anything stale is rebuilt). Timing caches sit in the
cache folder, one per TensorRT version, GPU and builder flags.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from stt_fast import cache
from stt_fast.devices import cuda_device_index
from stt_fast.files import cache_root
from stt_fast.model import STT

from .engine_runtime import (
    EngineCompatibilityError,
    EngineRunner,
    check_compatible,
    check_engine_bytes,
    import_tensorrt,
    read_sidecar,
)
from .onnx_cache import cache_key, cached_onnx
from .onnx_export import BatchRange, graph_precision
from .tensorrt import build_engine

log = logging.getLogger(__name__)


class EngineModule(nn.Module):
    """clips on the device (float or uint8, rescaled by the runner to the engine's input) -> logits; and,
    for the timeline, the program's two halves through two more engines (EngineHalves, built on first use)."""

    def __init__(self, runner: EngineRunner, halves: EngineHalves | None = None) -> None:
        super().__init__()
        self.runner = runner
        self.halves = halves

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.runner(clips)

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [F, 3, H, W] (uint8 or float in [0, 1]) -> features [F, N, C] in the engine's precision."""
        return self.halves.runner("frames")(frames)

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, T*N, C] -> logits [B, K] float32."""
        return self.halves.runner("windows")(features)


class EngineHalves:
    """The timeline's two engines (frames -> features, features -> logits), built from the program's two
    ONNX graphs (halves.py) beside the whole model's engine, each cached and checked as that one is. Once
    both are loaded, the two composed are checked against the reference on probe clips (ValidationError
    beyond the precision's tolerance), as the whole engine is checked after its build."""

    def __init__(self, model: STT, folder: Path, *, precision: str, batch: BatchRange, device: int,
                 here: dict[str, str], build_options: dict, cache_dir=None) -> None:
        self.model, self.folder, self.precision, self.batch, self.device = model, folder, precision, batch, device
        self.here, self.build_options, self.cache_dir = here, build_options, cache_dir
        self._runners: dict[str, EngineRunner] | None = None

    def runner(self, name: str) -> EngineRunner:
        if self._runners is None:
            self._runners = self._load()
        return self._runners[name]

    def _load(self) -> dict[str, EngineRunner]:
        from .halves import cached_halves, halves_profiles

        profiles = halves_profiles(self.batch, self.model.config.num_frames)
        runners = {}
        for name, onnx_file in cached_halves(self.model, self.precision, self.cache_dir).items():
            engine = self.folder / f"{name}.engine"
            problem = "a rebuild was asked for" if self.build_options.get("rebuild") else \
                cached_engine_problem(engine, **self.here)
            if problem is not None:
                log.info("stt_fast.compile: building the timeline's %s engine in %s (%s)", name, self.folder, problem)
                build_engine(onnx_file, engine, batch=profiles[name], device=self.device,
                             workspace_gib=self.build_options["workspace_gib"],
                             optimization_level=self.build_options["optimization_level"],
                             timing_cache=self.folder.parent)
            runners[name] = EngineRunner(engine, buffers="torch", device=self.device)
        report = halves_vs_reference(runners["frames"], runners["windows"], self.model, self.precision)
        if not report.passed:
            from stt_fast.compiler.validation import ValidationError

            raise ValidationError(f"the timeline's two TensorRT engines composed: {report}")
        return runners


def halves_vs_reference(frames: EngineRunner, windows: EngineRunner, model: STT, precision: str,
                        batch_sizes=(1, 3), seed: int = 0):
    """The two halves' engines composed (halves_logits) against the float32 reference on probe clips."""
    from stt_fast.accuracy import compare_logits, tolerance
    from stt_fast.compiler.validation import reference_logits

    from .halves import halves_logits
    from .onnx_export import PRECISION_DTYPES
    from .parity import probe_inputs

    probes = probe_inputs(model, batch_sizes, "uint8", seed)
    outs = [halves_logits(frames, windows, p).cpu().float() for p in probes]
    refs = [reference_logits(model, p) for p in probes]
    return compare_logits("the float32 reference model (two engines composed)", outs, refs,
                          tolerance(PRECISION_DTYPES[precision]).model, list(batch_sizes))


def cached_engine_problem(engine: Path, *, tensorrt_version: str, gpu_name: str,
                          compute_capability: str) -> str | None:
    """Why the engine cached at `engine` cannot be reused here (missing, its sidecar missing, unreadable or
    stale, its bytes not those the sidecar hashed, or not runnable by this TensorRT and GPU), or None."""
    if not engine.is_file():
        return "no engine cached yet"
    try:
        sidecar = read_sidecar(engine)
        check_engine_bytes(engine.read_bytes(), sidecar, engine)
        check_compatible(sidecar, tensorrt_version=tensorrt_version, gpu_name=gpu_name,
                         compute_capability=compute_capability)
    except (EngineCompatibilityError, KeyError, TypeError) as e:
        return f"the cached engine is unusable ({type(e).__name__}: {e})"
    return None


def compile_tensorrt(model: STT, *, device: torch.device, dtype: torch.dtype, batch: str | BatchRange = "1:8:64",
                     cache_dir: str | os.PathLike | None = None, workspace_gib: float = 4.0,
                     optimization_level: int = 3, rebuild: bool = False):
    from stt_fast.compiler import CompiledSTT

    trt = import_tensorrt()
    if device.type != "cuda":
        raise ValueError(f"backend 'tensorrt' runs on CUDA devices, not {device}")
    index = cuda_device_index(device)
    precision = graph_precision(dtype, "tensorrt")
    batch = BatchRange.parse(batch) if isinstance(batch, str) else batch
    props = torch.cuda.get_device_properties(index)
    capability = f"{props.major}.{props.minor}"
    root = cache_root("engines", cache_dir)
    folder = root / cache_key(model, precision, str(batch), trt.__version__, props.name, capability)
    engine = folder / "model.engine"
    problem = "a rebuild was asked for" if rebuild else cached_engine_problem(
        engine, tensorrt_version=trt.__version__, gpu_name=props.name, compute_capability=capability)
    if problem is not None:
        log.info("stt_fast.compile: building a TensorRT engine in %s (%s)", folder, problem)
        onnx_file = cached_onnx(model, folder, precision=precision, batch=batch)
        build_engine(onnx_file, engine, batch=batch, workspace_gib=workspace_gib,
                     optimization_level=optimization_level, timing_cache=root,
                     reference_model=model, device=index)
        cache.trim(keep=folder)
    cache.touch(folder)
    runner = EngineRunner(engine, buffers="torch", device=index)
    here = {"tensorrt_version": trt.__version__, "gpu_name": props.name, "compute_capability": capability}
    halves = EngineHalves(model, folder, precision=precision, batch=batch, device=index, here=here, cache_dir=cache_dir,
                          build_options={"workspace_gib": workspace_gib, "optimization_level": optimization_level,
                                         "rebuild": rebuild})
    return CompiledSTT(EngineModule(runner, halves), config=model.config, device=device, dtype=dtype,
                       backend="tensorrt")
