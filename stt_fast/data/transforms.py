"""Clip transforms (docs/model.md): the same geometric transform for every frame of a clip.

Training: random resized crop (area 8%-100% of the frame, aspect 3/4-4/3) to size x size, and a
horizontal flip with probability 1/2. Testing: resize to size x size. Frames are uint8 [T, 3, H, W]
in, float32 [T, 3, size, size] in [0, 1] out (no mean/std normalisation).
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F


def resize(frames: torch.Tensor, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [T, 3, H, W] -> [T, 3, size, size] (bilinear, antialiased): float32 in [0, 1], or uint8.

    Resized as uint8 and made float afterwards: the float copy of a clip of 720p frames would be 177 MB
    (44 MB at uint8), and torch's uint8 resampler is several times faster (frames in channels-last order,
    as decoders give them, are fastest). The uint8 result differs from resizing in float by under 1/255."""
    if frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.shape[-2:] != (size, size):
        frames = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if dtype == torch.uint8:
        return frames.contiguous()
    return frames.to(dtype).div_(255.0).contiguous()


def random_resized_crop_box(height: int, width: int, rng: random.Random, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering `scale` of the area with aspect ratio in `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    side = min(height, width)  # fall back to a centre crop
    return (height - side) // 2, (width - side) // 2, side, side


def train_transform(frames: torch.Tensor, size: int, rng: random.Random | None = None,
                    scale: tuple[float, float] = (0.08, 1.0)) -> torch.Tensor:
    rng = rng or random.Random()
    top, left, h, w = random_resized_crop_box(frames.shape[-2], frames.shape[-1], rng, scale=scale)
    out = resize(frames[..., top:top + h, left:left + w], size)
    return out.flip(-1) if rng.random() < 0.5 else out


def eval_transform(frames: torch.Tensor, size: int) -> torch.Tensor:
    return resize(frames, size)
