"""A Triton Inference Server model repository for an STT engine or ONNX file, with dynamic batching.

    REPO/NAME/config.pbtxt      platform, input "clips", output "logits", dynamic batching
    REPO/NAME/labels.txt        the class names, one per line (Triton's classification extension)
    REPO/NAME/1/model.plan      the TensorRT engine (its sidecar beside it), or 1/model.onnx

The model folder is assembled in a temporary folder and renamed into place: no half-written model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from stt_fast.config import EMOTIONS

from .engine_runtime import read_sidecar, sidecar_path
from .onnx_export import config_from_metadata, read_metadata

TRITON_TYPES = {"float32": "TYPE_FP32", "uint8": "TYPE_UINT8"}


def triton_config(name: str, platform: str, *, input_dtype: str, frames: int, image_size: int, num_classes: int,
                  max_batch_size: int, preferred_batch_sizes: list[int], max_queue_delay_us: int,
                  instances: int, has_labels: bool) -> str:
    preferred = ", ".join(str(b) for b in preferred_batch_sizes if b <= max_batch_size)
    labels = '\n    label_filename: "labels.txt"' if has_labels else ""
    return f"""name: "{name}"
platform: "{platform}"
max_batch_size: {max_batch_size}
input [
  {{
    name: "clips"
    data_type: {TRITON_TYPES[input_dtype]}
    dims: [ {frames}, 3, {image_size}, {image_size} ]
  }}
]
output [
  {{
    name: "logits"
    data_type: TYPE_FP32
    dims: [ {num_classes} ]{labels}
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: {max_queue_delay_us}
}}
instance_group [
  {{
    count: {instances}
    kind: KIND_GPU
  }}
]
"""


def write_triton_repository(model_file: str | os.PathLike, repository: str | os.PathLike, *, name: str = "stt",
                            max_batch_size: int | None = None, preferred_batch_sizes: tuple[int, ...] = (4, 8, 16, 32),
                            max_queue_delay_us: int = 2000, instances: int = 1, overwrite: bool = False) -> Path:
    """Write REPO/NAME for a TensorRT engine (.engine/.plan, with its sidecar) or an ONNX file."""
    model_file, repository = Path(model_file), Path(repository)
    if not model_file.is_file():
        raise FileNotFoundError(f"model file not found: {model_file}")
    if model_file.suffix == ".onnx":
        meta = read_metadata(model_file)
        config = config_from_metadata(meta)
        platform, target, input_dtype = "onnxruntime_onnx", "model.onnx", meta.get("stt_fast.input_dtype", "float32")
        profile_max = None
    else:
        sidecar = read_sidecar(model_file)
        from stt_fast.config import STTConfig

        config = STTConfig.from_dict(sidecar["config"])
        platform, target, input_dtype = "tensorrt_plan", "model.plan", sidecar["input"]["dtype"]
        profile_max = int(sidecar["profile"]["max"])
    max_batch_size = max_batch_size or profile_max or 64
    if profile_max is not None and max_batch_size > profile_max:
        raise ValueError(f"max_batch_size {max_batch_size} is above the engine's profile maximum {profile_max}")
    final = repository / name
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass --force to replace it")
    repository.mkdir(parents=True, exist_ok=True)
    has_labels = config.num_classes == len(EMOTIONS)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repository))
    try:
        (staging / "1").mkdir()
        shutil.copyfile(model_file, staging / "1" / target)
        if platform == "tensorrt_plan":
            shutil.copyfile(sidecar_path(model_file), sidecar_path(staging / "1" / target))
        if has_labels:
            (staging / "labels.txt").write_text("\n".join(EMOTIONS) + "\n")
        (staging / "config.pbtxt").write_text(triton_config(
            name, platform, input_dtype=input_dtype, frames=config.num_frames, image_size=config.image_size,
            num_classes=config.num_classes, max_batch_size=max_batch_size,
            preferred_batch_sizes=list(preferred_batch_sizes), max_queue_delay_us=max_queue_delay_us,
            instances=instances, has_labels=has_labels))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
