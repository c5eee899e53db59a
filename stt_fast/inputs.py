"""Checks and conversion of model inputs, shared by the reference model and every fast backend."""

from __future__ import annotations

import torch

from .config import STTConfig

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_clips(clips: torch.Tensor, config: STTConfig) -> None:
    """Raise ValueError naming the problem unless clips is a valid [B, T, 3, H, W] batch for config.

    Valid: uint8 (0-255) or floating point (expected in [0, 1]) with finite values, B >= 1, and T, H, W
    those of the config.
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
    # Values cannot be read on the meta device (used to count FLOPs); everything else is checked.
    if clips.is_floating_point() and clips.device.type != "meta" and not torch.isfinite(clips).all():
        raise ValueError("clips contain NaN or infinite values")


def clips_to_float(clips: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 clips / 255, or float clips as they are, in dtype."""
    if clips.dtype == torch.uint8:
        return clips.to(dtype) / 255.0
    return clips.to(dtype)
