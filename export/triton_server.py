"""A Triton Inference Server model repository for an STT engine or ONNX file, with dynamic batching.

    REPO/NAME/config.pbtxt      platform, input "clips", output "logits", dynamic batching, instance kind
    REPO/NAME/labels.txt        the class names, one per line (Triton's classification extension)
    REPO/NAME/1/model.plan      the TensorRT engine (its sidecar beside it), or 1/model.onnx
    REPO/NAME/2/...             a later model added to the same name (overwrite=True): Triton serves the
                                newest version by default and keeps the older ones to roll back to

A new model folder is assembled in a temporary folder and renamed into place, a new version likewise
(then config.pbtxt is replaced atomically): no half-written model.

A version-compatible TensorRT plan needs `tritonserver --backend-config=tensorrt,version-compatible=true`
(the generated config.pbtxt says so in a comment); a plain plan runs on a Triton release whose TensorRT
is exactly the engine's (the sidecar's tensorrt_version; each Triton release's notes list its TensorRT).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from stt_fast.config import EMOTIONS
from stt_fast.files import write_text_atomic

from .engine_runtime import read_sidecar, sidecar_path
from .onnx_export import config_from_metadata, read_metadata

TRITON_TYPES = {"float32": "TYPE_FP32", "uint8": "TYPE_UINT8"}
INSTANCE_KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
VERSION_COMPATIBLE_NOTE = ("# A version-compatible TensorRT plan: start the server with "
                           "--backend-config=tensorrt,version-compatible=true\n")


def triton_config(name: str, platform: str, *, input_dtype: str, frames: int, image_size: int, num_classes: int,
                  max_batch_size: int, preferred_batch_sizes: list[int], max_queue_delay_us: int,
                  instances: int, has_labels: bool, instance_kind: str = "gpu",
                  version_compatible: bool = False) -> str:
    """config.pbtxt text (protobuf text format of Triton's ModelConfig)."""
    if instance_kind not in INSTANCE_KINDS:
        raise ValueError(f"instance_kind must be one of {sorted(INSTANCE_KINDS)}, got {instance_kind!r}")
    if platform == "tensorrt_plan" and instance_kind != "gpu":
        raise ValueError("a TensorRT plan runs on a GPU only: instance kind 'cpu' is for ONNX models")
    preferred = ", ".join(str(b) for b in preferred_batch_sizes if b <= max_batch_size)
    labels = '\n    label_filename: "labels.txt"' if has_labels else ""
    note = VERSION_COMPATIBLE_NOTE if version_compatible else ""
    return f"""{note}name: "{name}"
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
    kind: {INSTANCE_KINDS[instance_kind]}
  }}
]
"""


def model_versions(model_folder: Path) -> list[int]:
    """The version folders (1, 2, ...) of a model folder in a repository, ascending."""
    if not model_folder.is_dir():
        return []
    return sorted(int(p.name) for p in model_folder.iterdir() if p.is_dir() and p.name.isdigit())


def _platform_of(config_text: str) -> str | None:
    match = re.search(r'^platform:\s*"([^"]+)"', config_text, re.MULTILINE)
    return match.group(1) if match else None


def write_triton_repository(model_file: str | os.PathLike, repository: str | os.PathLike, *, name: str = "stt",
                            max_batch_size: int | None = None, preferred_batch_sizes: tuple[int, ...] = (4, 8, 16, 32),
                            max_queue_delay_us: int = 2000, instances: int = 1, instance_kind: str = "gpu",
                            overwrite: bool = False) -> Path:
    """Write REPO/NAME for a TensorRT engine (.engine/.plan, with its sidecar) or an ONNX file, and return
    the version folder written. An existing REPO/NAME is refused unless overwrite, which adds the model
    as its next version (same platform only) and rewrites config.pbtxt."""
    model_file, repository = Path(model_file), Path(repository)
    if not model_file.is_file():
        raise FileNotFoundError(f"model file not found: {model_file}")
    version_compatible = False
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
        version_compatible = bool(sidecar.get("version_compatible"))
    max_batch_size = max_batch_size or profile_max or 64
    if profile_max is not None and max_batch_size > profile_max:
        raise ValueError(f"max_batch_size {max_batch_size} is above the engine's profile maximum {profile_max}")
    has_labels = config.num_classes == len(EMOTIONS)
    config_text = triton_config(
        name, platform, input_dtype=input_dtype, frames=config.num_frames, image_size=config.image_size,
        num_classes=config.num_classes, max_batch_size=max_batch_size,
        preferred_batch_sizes=list(preferred_batch_sizes), max_queue_delay_us=max_queue_delay_us,
        instances=instances, has_labels=has_labels, instance_kind=instance_kind,
        version_compatible=version_compatible)
    final = repository / name
    versions = model_versions(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass --force to add this model as version {(versions or [0])[-1] + 1}")
    if final.exists():
        existing = _platform_of((final / "config.pbtxt").read_text()) if (final / "config.pbtxt").is_file() else None
        if existing != platform:
            raise ValueError(f"{final} holds a {existing or 'unknown'} model; a {platform} model cannot be a new "
                             "version of it: choose another --name")
    repository.mkdir(parents=True, exist_ok=True)
    version = (versions or [0])[-1] + 1
    parent = final if final.exists() else repository
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=parent))
    try:
        folder = staging if final.exists() else staging / "1"
        folder.mkdir(exist_ok=True)
        shutil.copyfile(model_file, folder / target)
        if platform == "tensorrt_plan":
            shutil.copyfile(sidecar_path(model_file), sidecar_path(folder / target))
        if final.exists():  # a new version beside the others, then the config for it
            os.replace(staging, final / str(version))
            write_text_atomic(final / "config.pbtxt", config_text)
            if has_labels:
                write_text_atomic(final / "labels.txt", "\n".join(EMOTIONS) + "\n")
            return final / str(version)
        if has_labels:
            (staging / "labels.txt").write_text("\n".join(EMOTIONS) + "\n")
        (staging / "config.pbtxt").write_text(config_text)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final / "1"
