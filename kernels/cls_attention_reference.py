"""Plain-PyTorch reference of cls_attention (the Triton kernel beside it): the cls row of a block's
attention, computed the long way.

    h        = LayerNorm(x) * norm_weight + norm_bias           over D, every token
    q, k, v  = split(h @ qkv_weight^T + qkv_bias)               every token, [B, L, H, Dh] each
    out      = st_attention_reference(q, k, v, mode)[:, 0]      the cls row, [B, H * Dh]

Spatial mode: the cls row is the mean over frames of the cls query attending {cls} + the frame's tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .st_attention_reference import st_attention_reference


def cls_attention_reference(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                            qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, *, num_heads: int, num_frames: int,
                            mode: str) -> torch.Tensor:
    """x [B, L, D] (before the norm); qkv_weight [3D, D], qkv_bias [3D] -> [B, D] in x's dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    h = F.layer_norm(x.to(acc), x.shape[-1:], norm_weight.to(acc), norm_bias.to(acc), eps)
    qkv = F.linear(h, qkv_weight.to(acc), qkv_bias.to(acc)).unflatten(-1, (3, num_heads, -1))
    q, k, v = qkv.unbind(2)
    return st_attention_reference(q, k, v, num_frames=num_frames, mode=mode).select(1, 0).flatten(1).to(x.dtype)
