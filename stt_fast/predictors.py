"""One interface over every backend that turns clips into logits: the reference model, stt_fast.compile,
ONNX Runtime, and a TensorRT engine. Used by `stt-fast predict` and `stt-fast eval`."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import STTConfig

KINDS = ("reference", "compiled", "onnx", "tensorrt")


@dataclass
class Predictor:
    name: str
    config: STTConfig
    run: Callable[[torch.Tensor], torch.Tensor]  # clips [B, T, 3, H, W] float in [0, 1] -> logits [B, K]

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.run(clips).float().cpu()


@dataclass(frozen=True)
class ModelSpec:
    """A backend and its model file: what every worker needs to build the same predictor (picklable: it travels
    to Ray actors, in `stt-fast annotate --ray` and `stt-fast serve`)."""

    backend: str
    checkpoint: str | None
    onnx: str | None
    engine: str | None
    device: str | None

    def file(self) -> str:
        return {"onnx": self.onnx, "tensorrt": self.engine}.get(self.backend) or self.checkpoint or ""

    def config(self) -> STTConfig:
        """The model's config, read from its file without building the model: a file that is not a model
        fails here, in the driver, with the reader's one-line reason, before any worker starts."""
        if self.backend in ("reference", "compiled"):
            from .checkpoint import read_checkpoint

            return read_checkpoint(self.checkpoint)[0]
        if self.backend == "onnx":
            from stt_fast.export.onnx_export import config_from_metadata, read_metadata

            return config_from_metadata(read_metadata(self.onnx))
        from stt_fast.export.engine_runtime import read_sidecar

        return STTConfig.from_dict(read_sidecar(self.engine)["config"])

    def load(self) -> Predictor:
        return load_predictor(self.backend, checkpoint=self.checkpoint, onnx=self.onnx, engine=self.engine,
                              device=self.device)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_predictor(kind: str, *, checkpoint: str | os.PathLike | None = None, onnx: str | os.PathLike | None = None,
                   engine: str | os.PathLike | None = None, device: str | None = None) -> Predictor:
    """kind "reference" or "compiled" need a checkpoint, "onnx" an ONNX file, "tensorrt" an engine."""
    if kind not in KINDS:
        raise ValueError(f"unknown backend {kind!r}; choose one of {KINDS}")
    dev = torch.device(device) if device else default_device()
    if kind in ("reference", "compiled"):
        if checkpoint is None:
            raise ValueError(f"backend {kind!r} needs --checkpoint")
        from .checkpoint import load_checkpoint

        model = load_checkpoint(checkpoint, map_location=dev)
        if kind == "reference":
            return Predictor("reference", model.config, lambda clips: model(clips.to(dev)))
        from .compiler import compile as stt_compile

        fast = stt_compile(model, device=dev)
        return Predictor(f"compiled ({fast.backend}, {fast.dtype})", model.config, fast)
    if kind == "onnx":
        if onnx is None:
            raise ValueError("backend 'onnx' needs --onnx MODEL.onnx")
        from stt_fast.export.onnx_export import config_from_metadata, read_metadata
        from stt_fast.export.openvino_backend import openvino_available
        from stt_fast.export.parity import ort_session, run_session

        from .inputs import clips_to_float

        meta = read_metadata(onnx)
        uint8 = meta.get("stt_fast.input_dtype") == "uint8"
        if meta.get("stt_fast.precision") == "int8" and dev.type == "cpu" and openvino_available():
            # an int8 graph (stt-fast quantize): OpenVINO runs it faster than ONNX Runtime on the CPU
            from stt_fast.export.quantize import openvino_session

            run_int8 = openvino_session(onnx)
            return Predictor("openvino (int8)", config_from_metadata(meta),
                             lambda clips: torch.from_numpy(run_int8(clips_to_float(clips, torch.float32).numpy())))
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if dev.type == "cuda" else None
        session = ort_session(onnx, providers)

        def run_onnx(clips):
            clips = (clips * 255).round().to(torch.uint8) if uint8 and clips.is_floating_point() else clips
            return run_session(session, clips)

        return Predictor(f"onnxruntime ({meta.get('stt_fast.precision')})", config_from_metadata(meta), run_onnx)
    if engine is None:
        raise ValueError("backend 'tensorrt' needs --engine MODEL.engine")
    from stt_fast.export.engine_runtime import EngineRunner

    from .devices import cuda_device_index

    # float clips in [0, 1] go to the runner as they are: it rescales them to the engine's input dtype
    runner = EngineRunner(engine, buffers="torch", device=cuda_device_index(dev))
    config = STTConfig.from_dict(runner.sidecar["config"])
    return Predictor(f"tensorrt ({runner.sidecar['precision']})", config, runner)
