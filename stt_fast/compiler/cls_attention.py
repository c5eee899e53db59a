"""The last block's attention for the cls query alone, with the key and value projections absorbed.

Only the cls token leaves the model, so the last block's (spatial or joint) attention is needed for
one query. With that one query the projections of the other tokens need not be computed: for a head
with q = W_q h_0 + b_q, k_j = W_k h_j + b_k and v_j = W_v h_j + b_v,

    score_j = scale * q . k_j = (scale * W_k^T q) . h_j + scale * q . b_k     (last term: the same for
                                                                             every j, cancels in softmax)
    out     = sum_j p_j v_j   = W_v (sum_j p_j h_j) + b_v                    (the p_j sum to 1)

so the key and value projections of all L tokens (2 D^2 multiply-adds per token) become two products
with h per head (2 H D per token), 64 times fewer at D = 512, H = 8. The function is unchanged.
Spatial mode takes a softmax per frame over {cls} + the frame's tokens and averages over frames.

This is the torch op sets' form (and the exported graphs'); the Triton op set runs the same absorption as
one kernel that also normalises the tokens (stt_fast.kernels.cls_attention).
"""

from __future__ import annotations

import torch

from stt_fast import layout


def absorbed_cls_attention(h: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, *, num_heads: int,
                           num_frames: int, mode: str) -> torch.Tensor:
    """Attention output of the cls row: h [B, L, D] normalised tokens -> [B, D] (before proj). qkv_weight
    [3D, D] and qkv_bias [3D] are the block's qkv projection, read through views (nothing copied)."""
    # Plain (broadcast) matrix products only, so that exported graphs hold MatMul, not Einsum.
    batch, _, dim = h.shape
    head_dim = dim // num_heads
    w_q, w_k, w_v = (qkv_weight.narrow(0, i * dim, dim) for i in range(3))
    b_q, b_v = qkv_bias.narrow(0, 0, dim), qkv_bias.narrow(0, 2 * dim, dim)
    q = torch.nn.functional.linear(h.select(1, 0), w_q, b_q).view(batch, num_heads, 1, head_dim)  # [B, H, 1, Dh]
    u = torch.matmul(q, w_k.view(num_heads, head_dim, dim)).squeeze(2) * head_dim**-0.5  # [B, H, D]
    scores = torch.matmul(u, h.transpose(1, 2))  # [B, H, L]; softmax in float32 (or wider)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if mode == "joint":
        mixed = torch.matmul(scores.softmax(dim=-1).to(h.dtype), h)  # [B, H, D]
    else:  # spatial: per frame, {cls} + the frame's tokens; mean over frames
        cls_scores, patch_scores = layout.split_tokens(scores.transpose(1, 2), num_frames)
        cls_scores = cls_scores.unsqueeze(1).expand(-1, num_frames, -1, -1)  # [B, T, 1, H]
        probs = torch.cat([cls_scores, patch_scores], dim=2).softmax(dim=2).to(h.dtype)  # [B, T, 1+N, H]
        h_cls, h_patches = layout.split_tokens(h, num_frames)  # [B, 1, D], [B, T, N, D]
        cls_weight = probs.select(2, 0).sum(dim=1).unsqueeze(-1)  # [B, H, 1]
        patch_weights = probs.narrow(2, 1, probs.shape[2] - 1).permute(0, 3, 1, 2).flatten(2)  # [B, H, T*N]
        mixed = (cls_weight * h_cls + torch.matmul(patch_weights, h_patches.flatten(1, 2))) / num_frames
    out = torch.matmul(mixed.unsqueeze(2), w_v.view(num_heads, head_dim, dim).transpose(1, 2)).squeeze(2)  # [B, H, Dh]
    return (out + b_v.view(num_heads, head_dim)).flatten(1)
