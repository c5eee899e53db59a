"""Plain-PyTorch reference of st_attention: explicit matmul, float32 softmax, matmul.

This is the attention of the reference model (stt_fast.model) and the ground truth of the Triton
kernel beside it. It regroups tokens through stt_fast.layout, so it knows nothing of the layout
itself. For each group of tokens (see stt_fast.layout):

    O = softmax((scale * Q) K^T) V,    softmax in float32 (float64 when the inputs are float64)
"""

from __future__ import annotations

import torch

from stt_fast import layout

from .contract import check_attention_inputs


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Full attention within groups: q, k, v [..., S, H, Dh] -> [..., S, H, Dh].

    The scale multiplies Q before the first product, as TensorRT's attention fusion requires of the
    graphs it fuses ("Fused Attention" in its developer guide), and which keeps float16 scores of large
    activations from overflowing before the float32 softmax."""
    q, k, v = (t.transpose(-2, -3) for t in (q, k, v))  # [..., H, S, Dh]
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v).transpose(-2, -3)


def grouped_attention(attend_fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_frames: int, mode: str,
                      scale: float | None = None) -> torch.Tensor:
    """Regroup the tokens for `mode` (stt_fast.layout), run attend_fn(q, k, v, scale) on [..., S, H, Dh]
    groups, and put the results back in token order: a contiguous [B, L, H, Dh]."""
    shape = check_attention_inputs(q, k, v, num_frames=num_frames, mode=mode)
    scale = shape.head_dim**-0.5 if scale is None else scale
    if mode == "joint":
        out = attend_fn(q, k, v, scale)
    elif mode == "temporal":
        groups = [layout.to_temporal_groups(t, num_frames) for t in (q, k, v)]
        out = layout.from_temporal_groups(attend_fn(*groups, scale))
    else:
        groups = [layout.to_spatial_groups(t, num_frames) for t in (q, k, v)]
        out = layout.from_spatial_groups(attend_fn(*groups, scale))
    return layout.contiguous(out)


def st_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_frames: int,
                           mode: str, scale: float | None = None) -> torch.Tensor:
    """Spatio-temporal attention, same contract as ``stt_fast.kernels.st_attention``.

    q, k, v: [B, L, H, Dh] (any strides), L = 1 + num_frames * N. Returns a contiguous [B, L, H, Dh].
    """
    return grouped_attention(attend, q, k, v, num_frames=num_frames, mode=mode, scale=scale)
