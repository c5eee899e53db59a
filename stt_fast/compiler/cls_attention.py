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
"""

from __future__ import annotations

import torch
from torch import nn

from stt_fast import layout


class AbsorbedClsAttention(nn.Module):
    """Attention output of the cls row, [B, L, D] normalised tokens -> [B, D] (before proj)."""

    def __init__(self, qkv: nn.Linear, num_heads: int, num_frames: int, mode: str) -> None:
        super().__init__()
        dim = qkv.in_features
        head_dim = dim // num_heads
        self.num_heads, self.num_frames, self.mode = num_heads, num_frames, mode
        self.scale = head_dim**-0.5
        weight = qkv.weight.detach()
        bias = qkv.bias.detach() if qkv.bias is not None else weight.new_zeros(3 * dim)
        self.q = nn.Linear(dim, dim, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.q.weight.copy_(weight[:dim])
            self.q.bias.copy_(bias[:dim])
        self.w_k = nn.Parameter(weight[dim:2 * dim].view(num_heads, head_dim, dim).clone())  # [H, Dh, D]
        self.w_v = nn.Parameter(weight[2 * dim:].view(num_heads, head_dim, dim).clone())  # [H, Dh, D]
        self.b_v = nn.Parameter(bias[2 * dim:].view(num_heads, head_dim).clone())  # [H, Dh]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # Plain (broadcast) matrix products only, so that exported graphs hold MatMul, not Einsum.
        batch = h.shape[0]
        q = self.q(h.select(1, 0)).view(batch, self.num_heads, 1, -1)  # [B, H, 1, Dh]
        u = torch.matmul(q, self.w_k).squeeze(2) * self.scale  # [B, H, D]
        scores = torch.matmul(u, h.transpose(1, 2))  # [B, H, L]; softmax in float32 (or wider)
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        if self.mode == "joint":
            mixed = torch.matmul(scores.softmax(dim=-1).to(h.dtype), h)  # [B, H, D]
        else:  # spatial: per frame, {cls} + the frame's tokens; mean over frames
            cls_scores, patch_scores = layout.split_tokens(scores.transpose(1, 2), self.num_frames)
            cls_scores = cls_scores.unsqueeze(1).expand(-1, self.num_frames, -1, -1)  # [B, T, 1, H]
            probs = torch.cat([cls_scores, patch_scores], dim=2).softmax(dim=2).to(h.dtype)  # [B, T, 1+N, H]
            h_cls, h_patches = layout.split_tokens(h, self.num_frames)  # [B, 1, D], [B, T, N, D]
            cls_weight = probs.select(2, 0).sum(dim=1).unsqueeze(-1)  # [B, H, 1]
            patch_weights = probs.narrow(2, 1, probs.shape[2] - 1).permute(0, 3, 1, 2).flatten(2)  # [B, H, T*N]
            mixed = (cls_weight * h_cls + torch.matmul(patch_weights, h_patches.flatten(1, 2))) / self.num_frames
        out = torch.matmul(mixed.unsqueeze(2), self.w_v.transpose(1, 2)).squeeze(2)  # [B, H, Dh]
        return (out + self.b_v).flatten(1)
