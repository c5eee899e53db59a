"""The program's two halves as two exported graphs, for the timeline on the exported backends.

    frames.onnx    "frames" [F, 3, H, W] float in [0, 1]  ->  "features" [F, N, C]   (the backbone, per frame)
    windows.onnx   "features" [B, T*N, C]                 ->  "logits" [B, K]         (the rest, per window)

The same STTProgram (export ops) as the whole-model graph, cut where a frame's work ends: a frame's features
do not depend on the window it is in, so the timeline runs each frame through frames.onnx once and each
window through windows.onnx. Exported on first use and cached beside the whole graph (same cache).
Each file's metadata names its graph ("stt_fast.graph") and its I/O ("stt_fast.io"), so that TensorRT
builds an engine from each as from the whole graph (tensorrt_backend.py). ONNX Runtime and OpenVINO run
them on this project's CPU machine; the TensorRT engines have not been built here (no TensorRT).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stt_fast import cache
from stt_fast.files import cache_root
from stt_fast.model import STT

from .engine_runtime import GRAPHS
from .onnx_export import DEFAULT_OPSET, MAX_DYNAMIC_BATCH, BatchRange, export_program, onnx_metadata, quiet_exporter
from .simplify import simplify_onnx

log = logging.getLogger(__name__)
HALVES = {name: GRAPHS[name] for name in ("frames", "windows")}


def halves_io(config, precision: str) -> dict[str, dict[str, dict]]:
    """Each half's input and output as {name, dtype, shape [-1, ...]}: frames [F, 3, S, S] float32 in [0, 1]
    -> features [F, N, C]; features [B, T*N, C] -> logits [B, K] float32; features in the graph's precision."""
    features = "float16" if precision == "fp16" else "float32"
    frame = {"name": "frames", "dtype": "float32", "shape": [-1, 3, config.image_size, config.image_size]}
    per_frame = {"name": "features", "dtype": features, "shape": [-1, config.num_patches, config.backbone_channels]}
    per_window = dict(per_frame, shape=[-1, config.num_frames * config.num_patches, config.backbone_channels])
    logits = {"name": "logits", "dtype": "float32", "shape": [-1, config.num_classes]}
    return {"frames": {"input": frame, "output": per_frame}, "windows": {"input": per_window, "output": logits}}


def halves_profiles(batch: BatchRange, num_frames: int) -> dict[str, BatchRange]:
    """The engines' batch profiles for the timeline, from the whole model's profile in clips: the frames
    half takes up to the frames of batch.max clips, tuned for one window's (T); the windows half takes
    batch.min..batch.max windows, tuned for one (a live timeline completes one window at a time)."""
    return {"frames": BatchRange(batch.min, num_frames, max(num_frames, batch.max * num_frames)),
            "windows": BatchRange(batch.min, max(batch.min, 1), batch.max)}


class _FramesHalf(nn.Module):
    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.program.frame_features(frames)


class _WindowsHalf(_FramesHalf):
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.program.classify_features(features)


def export_halves(model: STT, folder: Path, *, precision: str = "fp32") -> dict[str, Path]:
    """folder/frames.onnx and folder/windows.onnx (simplified), written atomically; existing ones kept."""
    paths = {name: folder / f"{name}.onnx" for name in HALVES}
    if all(p.is_file() for p in paths.values()):
        return paths
    import onnx

    program = export_program(model, precision=precision)
    c = model.config
    dtype = torch.float16 if precision == "fp16" else torch.float32
    examples = {"frames": torch.rand(2, 3, c.image_size, c.image_size),
                "windows": torch.randn(2, c.num_frames * c.num_patches, c.backbone_channels).to(dtype)}
    modules = {"frames": _FramesHalf(program), "windows": _WindowsHalf(program)}
    io = halves_io(c, precision)
    profiles = halves_profiles(BatchRange(1, 8, 64), c.num_frames)
    log.info("stt_fast: exporting the program's two halves to ONNX for the timeline; cached in %s", folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (input_name, output_name) in HALVES.items():
        dynamic = {input_name: {0: torch.export.Dim("rows", min=1, max=MAX_DYNAMIC_BATCH)}}
        meta = onnx_metadata(model, precision=precision, input_dtype=io[name]["input"]["dtype"], opset=DEFAULT_OPSET,
                             attention_op=False, batch=profiles[name], checkpoint_sha256=None)
        meta |= {"stt_fast.graph": name, "stt_fast.io": json.dumps(io[name], sort_keys=True)}
        with tempfile.TemporaryDirectory(prefix="stt_fast-onnx-") as tmp, quiet_exporter():
            exported = torch.onnx.export(modules[name], (examples[name],), dynamo=True, input_names=[input_name],
                                         output_names=[output_name], dynamic_shapes=dynamic,
                                         opset_version=DEFAULT_OPSET, verbose=False)
            proto = exported.model_proto
            for key, value in meta.items():
                proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
            raw = Path(tmp) / "raw.onnx"
            onnx.save(proto, str(raw))
            simplify_onnx(raw, paths[name])
    return paths


def cached_halves(model: STT, precision: str, cache_dir=None) -> dict[str, Path]:
    """The two graphs of model's program at precision, from the cache of exported graphs."""
    from .onnx_cache import cache_key

    folder = cache_root("onnx", cache_dir) / cache_key(model, precision, "halves", "with-metadata")
    paths = export_halves(model, folder, precision=precision)
    cache.touch(folder)
    return paths


class ExportedHalves:
    """frame_features / classify_features through two graphs run by `run(path) -> (inputs -> output)`
    (an ONNX Runtime session or an OpenVINO compiled model), built on first use."""

    def __init__(self, model: STT, precision: str, make_runner: Callable[[Path], Callable], cache_dir=None) -> None:
        self.model, self.precision, self.make_runner, self.cache_dir = model, precision, make_runner, cache_dir
        self.runners: dict[str, Callable] | None = None
        self.dtype = np.float16 if precision == "fp16" else np.float32

    def _run(self, name: str, x: np.ndarray) -> torch.Tensor:
        if self.runners is None:
            paths = cached_halves(self.model, self.precision, self.cache_dir)
            self.runners = {n: self.make_runner(p) for n, p in paths.items()}
        return torch.from_numpy(np.asarray(self.runners[name](np.ascontiguousarray(x))))

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [F, 3, H, W] (uint8 or float in [0, 1]) -> features [F, N, C]."""
        from stt_fast.inputs import clips_to_float

        return self._run("frames", clips_to_float(frames.cpu(), torch.float32).numpy())

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, T*N, C] -> logits [B, K] float32."""
        return self._run("windows", features.cpu().numpy().astype(self.dtype)).float()


def halves_logits(frame_features: Callable, classify_features: Callable, clips: torch.Tensor) -> torch.Tensor:
    """clips [B, T, 3, H, W] -> logits [B, K] through the two halves: every frame's features [B*T, N, C],
    then each clip's T frames' rows [B, T*N, C] classified, as the timeline composes them."""
    b, t = clips.shape[:2]
    features = torch.as_tensor(frame_features(clips.flatten(0, 1)))
    return torch.as_tensor(classify_features(features.reshape(b, t * features.shape[1], features.shape[2])))
