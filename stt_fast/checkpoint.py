"""Checkpoints: the model's weights and its config in one safetensors file (no pickled code).

The header also holds a SHA-256 of the tensors (names, shapes, dtypes and bytes): a file whose weights
changed after it was written (a flipped byte, a bad copy) is refused instead of loading silently.

Also loads torchvision-format ResNet-18 weights (ImageNet or face-recognition weights) into the
backbone: layer4.* and fc.* are skipped, every other key must match exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import STTConfig
from .files import atomic_output
from .model import STT

FORMAT = "stt_fast-checkpoint-v1"
TORCHVISION_SKIPPED_PREFIXES = ("layer4.", "fc.")


class CheckpointError(ValueError):
    """A checkpoint or weight file that cannot be used, with the reason."""


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:  # pragma: no cover - safetensors is a dependency
        raise ImportError("checkpoints need the 'safetensors' package: pip install safetensors") from e
    return safetensors.torch


def save_checkpoint(model: STT, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write model's weights and config to path (atomically). metadata: extra JSON-able facts."""
    if not isinstance(model, STT):
        raise ValueError(f"save_checkpoint expects an stt_fast.STT, got {type(model).__name__}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    header = {"format": FORMAT, "config": model.config.to_json(),
              "metadata": json.dumps(metadata or {}, sort_keys=True), "tensors_sha256": tensors_fingerprint(tensors)}
    with atomic_output(path) as tmp:
        _safetensors().save_file(tensors, str(tmp), metadata=header)
    return Path(path)


# A checkpoint's config is read from a file that may come from anywhere: sizes beyond these are refused
# before anything is built (the paper's model is 16 x 112 px, D 512, depth 4, 8 heads, width 64).
CONFIG_BOUNDS = {"num_frames": 256, "image_size": 1024, "num_classes": 10_000, "embed_dim": 4096, "depth": 64,
                 "num_heads": 128, "backbone_width": 512, "mlp_ratio": 16}


def check_config_bounds(config: STTConfig, source: str) -> None:
    over = [f"{name} {getattr(config, name)} > {bound}" for name, bound in CONFIG_BOUNDS.items()
            if getattr(config, name) > bound]
    if over:
        raise CheckpointError(f"{source} declares a model beyond stt_fast's bounds ({', '.join(over)}); not built")


def expected_shapes(config: STTConfig) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor an STT of config holds, from a model built without memory (meta)."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in STT(config).state_dict().items()}


def read_checkpoint(path: str | os.PathLike) -> tuple[STTConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, state dict, metadata) of a checkpoint file, with a clear error for a bad file.

    Checked in the order that keeps a hostile file cheap: the header (format, the hash of the weights
    present, the config within CONFIG_BOUNDS), then every tensor's name and shape against the config's
    model, all before a tensor is read; then the weights against their hash."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        hint = f": pass a file in it, e.g. {found[0]}" if found else " (it holds no .safetensors file)"
        raise IsADirectoryError(f"{path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    st = _safetensors()
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # safetensors raises several types for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable stt_fast checkpoint (corrupted, truncated, "
                              f"or not a safetensors file): {e}") from e
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not an stt_fast checkpoint "
                              f"(format {header.get('format')!r}, expected {FORMAT!r})")
    recorded = header.get("tensors_sha256")
    if not recorded:
        raise CheckpointError(f"{path} carries no hash of its weights (written by an stt_fast older than the hash, "
                              "or edited): save it again with stt_fast.save_checkpoint")
    try:
        config = STTConfig.from_json(header["config"])
        metadata = json.loads(header.get("metadata", "{}"))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} has an invalid config: {e}") from e
    check_config_bounds(config, str(path))
    expected = expected_shapes(config)
    if shapes != expected:
        wrong = sorted(set(shapes) ^ set(expected)) + sorted(k for k in set(shapes) & set(expected)
                                                             if shapes[k] != expected[k])
        raise CheckpointError(f"{path}: its tensors do not fit the model its config describes ({len(wrong)} differ, "
                              f"e.g. {wrong[0]})")
    try:
        tensors = st.load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable stt_fast checkpoint (corrupted or truncated): {e}") from e
    if recorded != tensors_fingerprint(tensors):
        raise CheckpointError(f"{path} is damaged: its weights do not match the hash recorded when it was saved "
                              "(a changed byte, a bad copy); use another copy of the checkpoint")
    return config, tensors, metadata


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict) with one clear error listing missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError(f"weights in {source} do not match the model; " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> STT:
    """The STT saved at path, in eval mode, on map_location."""
    config, tensors, _ = read_checkpoint(path)
    model = STT(config)
    load_state_strict(model, tensors, str(path))
    return model.to(map_location).eval()


def load_torchvision_resnet18(model: STT, weights: str | os.PathLike | dict[str, torch.Tensor]) -> STT:
    """Load torchvision-format ResNet-18 weights into model.backbone (layer4 and fc skipped).

    weights: a state dict, or a file written by torch.save (read with weights_only=True) or safetensors.
    A "module." prefix (DataParallel checkpoints) and a {"state_dict": ...} wrapper are accepted.
    """
    source = "the given state dict"
    if not isinstance(weights, dict):
        source = str(weights)
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        try:
            if path.suffix == ".safetensors":
                weights = _safetensors().load_file(str(path))
            else:
                weights = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable weights file: {e}") from e
    if isinstance(weights.get("state_dict"), dict):
        weights = weights["state_dict"]
    state = {k.removeprefix("module."): v for k, v in weights.items()
             if isinstance(v, torch.Tensor)}
    state = {k: v for k, v in state.items() if not k.startswith(TORCHVISION_SKIPPED_PREFIXES)}
    load_state_strict(model.backbone, state, source)
    return model


def state_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of a module's state: a cache key for weights."""
    return tensors_fingerprint(model.state_dict())


def tensors_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of named tensors."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
