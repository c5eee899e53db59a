"""st_attention through PyTorch's scaled_dot_product_attention, one SDPA call per grouping.

The CPU fast path of stt_fast.compile, and the SDPA peer of the kernel benchmark. Unlike the fused
kernel it must materialise the groups SDPA wants (stt_fast.layout): the temporal groups are a strided
view, the spatial groups a copy with the cls token repeated for every frame, and the cls mean a
separate reduction. Same contract as st_attention (kernels/contract.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .st_attention_reference import grouped_attention


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """[..., S, H, Dh] -> [..., S, H, Dh] through SDPA, which wants [batch, H, S, Dh].

    The group dimensions are merged into SDPA's one batch dimension (a copy where strides forbid a
    view): some SDPA implementations (inductor's CPU lowering, for one) take 4-D inputs only.
    """
    lead = q.shape[:-3]
    q, k, v = (t.reshape(-1, *t.shape[-3:]).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)
    return out.reshape(*lead, *out.shape[1:])


def st_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_frames: int, mode: str,
                      scale: float | None = None) -> torch.Tensor:
    """Spatio-temporal attention by SDPA over regrouped tokens: [B, L, H, Dh] -> contiguous [B, L, H, Dh]."""
    return grouped_attention(_sdpa, q, k, v, num_frames=num_frames, mode=mode, scale=scale)
