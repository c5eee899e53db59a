"""The input contract of st_attention, shared by the kernel and its reference.

q, k, v: [B, L, H, Dh] tensors of any strides (usually views into one packed [B, L, 3, H, Dh]
projection), L = 1 + T * N. Structural problems raise ValueError naming the problem; the kernel adds
its own limits (dtype, head dim) on top, in kernels/st_attention.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from stt_fast.layout import patches_per_frame

MODES = ("joint", "spatial", "temporal")


class AttentionShape(NamedTuple):
    batch: int
    length: int
    heads: int
    head_dim: int
    num_frames: int
    num_patches: int


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_frames: int,
                           mode: str) -> AttentionShape:
    """Validate q, k, v against the contract and return the sizes it implies."""
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; expected one of {MODES}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, L, H, Dh], got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k and v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v are on different devices: {q.device}, {k.device}, {v.device}")
    if not isinstance(num_frames, int) or isinstance(num_frames, bool):
        raise ValueError(f"num_frames must be an int, got {num_frames!r}")
    batch, length, heads, head_dim = q.shape
    if batch < 1 or heads < 1 or head_dim < 1:
        raise ValueError(f"q has an empty dimension: shape {tuple(q.shape)}")
    num_patches = patches_per_frame(length, num_frames)
    return AttentionShape(batch, length, heads, head_dim, num_frames, num_patches)
