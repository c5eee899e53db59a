"""The token layout: the one place that knows where each token of a clip sits.

A clip of T frames with N patch tokens per frame is a sequence of L = 1 + T * N tokens:

    index 0                 the cls token
    index 1 + t * N + n     frame t, grid position n (row-major over the 7 x 7 grid)

Everything that regroups tokens (the reference attention, the CPU fast path, the tests) goes through
the helpers below. The Triton kernel (kernels/st_attention.py) computes the same row indices inside
the kernel; its tests check it against the reference built on these helpers.

The helpers slice with narrow() and select(), not Python indexing, and so do the compiled program's
modules: fake CUDA tensors, which check the GPU path on machines without a GPU, can be neither indexed
nor made .contiguous() in a CPU-only PyTorch build (contiguous() below stands in for the latter).

The attention groupings of STT, in this layout:

- temporal: for each position n, the T tokens {1 + t * N + n : t < T} attend within themselves;
  the cls token takes no part (its output row is zero).
- spatial: for each frame t, {cls} + {1 + t * N + n : n < N} attend within themselves; the patch
  rows take their result, the cls row takes the mean of its T per-frame results.
- joint: all L tokens attend to each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contiguous(x: torch.Tensor) -> torch.Tensor:
    """x.contiguous(), in the form fake CUDA tensors take (see above)."""
    return x if x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)


def num_tokens(num_frames: int, num_patches: int) -> int:
    """L = 1 + T * N."""
    return 1 + num_frames * num_patches


def patches_per_frame(length: int, num_frames: int) -> int:
    """N from L and T; ValueError when L is not 1 + T * N for a whole N >= 1."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if length < 1 + num_frames or (length - 1) % num_frames:
        raise ValueError(
            f"sequence length L={length} is not 1 + T*N for T={num_frames} and a whole N >= 1")
    return (length - 1) // num_frames


def patch_index(frame: int, position: int, num_patches: int) -> int:
    """Row of frame t, position n: 1 + t * N + n."""
    return 1 + frame * num_patches + position


def assemble_tokens(cls_token: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """[B or 1, 1, D] cls and [B, T, N, D] patch tokens -> [B, L, D] tokens in the layout above."""
    # expand_as, not expand(B, ...): tracers (the legacy ONNX exporter) keep the batch size symbolic.
    return torch.cat([cls_token.expand_as(patches.select(1, 0).narrow(1, 0, 1)), patches.flatten(1, 2)], dim=1)


def split_tokens(x: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, *rest] -> cls [B, 1, *rest] and patches [B, T, N, *rest], both views of x."""
    n = patches_per_frame(x.shape[1], num_frames)
    return x.narrow(1, 0, 1), x.narrow(1, 1, x.shape[1] - 1).unflatten(1, (num_frames, n))


def merge_tokens(cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Inverse of split_tokens: cls [B, 1, *rest] and patches [B, T, N, *rest] -> [B, L, *rest]."""
    return torch.cat([cls, patches.flatten(1, 2)], dim=1)


def to_temporal_groups(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[B, L, *rest] -> [B, N, T, *rest]: one group of T tokens per grid position (a view)."""
    _, patches = split_tokens(x, num_frames)
    return patches.transpose(1, 2)


def from_temporal_groups(groups: torch.Tensor) -> torch.Tensor:
    """[B, N, T, *rest] -> [B, L, *rest] with a zero cls row (the cls token takes no part)."""
    patches = groups.transpose(1, 2).flatten(1, 2)  # [B, T*N, *rest]
    # A zero row padded in front, not a zeros tensor concatenated: tracers would freeze its batch size.
    return F.pad(patches, (0, 0) * (patches.dim() - 2) + (1, 0))


def to_spatial_groups(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[B, L, *rest] -> [B, T, 1 + N, *rest]: per frame, the cls token then the frame's N tokens."""
    cls, patches = split_tokens(x, num_frames)
    cls = cls.unsqueeze(1).expand(-1, num_frames, *([-1] * (cls.dim() - 1)))
    return torch.cat([cls, patches], dim=2)


def from_spatial_groups(groups: torch.Tensor) -> torch.Tensor:
    """[B, T, 1 + N, *rest] -> [B, L, *rest]: patch rows as they are, cls = mean over the T frames."""
    cls = groups.narrow(2, 0, 1).mean(dim=1)
    return merge_tokens(cls, groups.narrow(2, 1, groups.shape[2] - 1))
