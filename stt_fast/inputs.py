"""Checks and conversion of model inputs, shared by the reference model and every fast backend.

Two kinds of checks, with different costs:

- structure (type, rank, frame count, size, dtype): read from the tensor's metadata on the host, free,
  always done, also while torch.compile, torch.export or an ONNX exporter traces the model;
- values (no NaN or infinity in float clips): reading values of a tensor on a GPU is a reduction and
  a blocking device-to-host sync. So values are read on the host only where that is free or wanted:
  the reference model reads them in eager mode (clarity over speed: it is the ground truth), a
  compiled module reads them when clips arrive from the CPU, and for clips already on the device it
  never synchronises: nan_rows_where_nonfinite() gives every clip holding a NaN or infinity NaN
  logits, inside the captured CUDA graph.
"""

from __future__ import annotations

import math

import torch

from .config import STTConfig

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tracing() -> bool:
    """True while torch.compile / torch.export or an ONNX exporter traces: there are no values to read."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _values_readable(clips: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return not tracing() and clips.device.type != "meta" and not is_fake(clips)


def check_clips(clips: torch.Tensor, config: STTConfig, *, values_on_device: bool = True) -> None:
    """Raise ValueError naming the problem unless clips is a valid [B, T, 3, H, W] batch for config.

    Valid: uint8 (0-255) or floating point (expected in [0, 1]) without NaN or infinity, B >= 1, and T,
    H, W those of the config. Values are not read while tracing, nor for tensors without data (meta,
    fake), nor, when values_on_device is False, for tensors off the CPU (reading them would sync).
    """
    if not isinstance(clips, torch.Tensor):
        raise ValueError(f"clips must be a torch.Tensor, got {type(clips).__name__}")
    if clips.dim() != 5:
        raise ValueError(f"clips must be 5-D [B, T, 3, H, W], got shape {tuple(clips.shape)}")
    batch, frames, channels, height, width = clips.shape
    if batch == 0:
        raise ValueError("clips is an empty batch (B = 0)")
    if frames != config.num_frames:
        raise ValueError(f"clips have {frames} frames, the model expects {config.num_frames}")
    if channels != 3:
        raise ValueError(f"clips must have 3 (RGB) channels, got {channels}")
    if (height, width) != (config.image_size, config.image_size):
        raise ValueError(f"clips are {height}x{width}, the model expects "
                         f"{config.image_size}x{config.image_size}")
    if clips.dtype != torch.uint8 and clips.dtype not in FLOAT_DTYPES:
        raise ValueError(f"clips must be uint8 or floating point, got {clips.dtype}")
    values = values_on_device or clips.device.type == "cpu"
    if values and clips.is_floating_point() and _values_readable(clips) and not torch.isfinite(clips).all():
        raise ValueError("clips contain NaN or infinite values")


def nan_rows_where_nonfinite(logits: torch.Tensor, clips: torch.Tensor) -> torch.Tensor:
    """logits [B, K] with row b set to NaN where clip b holds a NaN or infinity; no host sync."""
    if not clips.is_floating_point():
        return logits
    finite = torch.isfinite(clips).flatten(1).all(dim=1, keepdim=True)
    return logits.masked_fill(finite.logical_not(), math.nan)


def clips_to_float(clips: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 clips / 255, or float clips as they are, in dtype."""
    if clips.dtype == torch.uint8:
        return clips.to(dtype) / 255.0
    return clips.to(dtype)
