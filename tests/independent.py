"""Independent implementations used as ground truth by the tests, in float64.

They share no code with the package: groups are built by explicit index lists, one group at a time,
and the divided block follows TimeSformer's formulation (cls repeated per frame, then averaged).
"""

from __future__ import annotations

import torch


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """[S, Dh] x3 -> [S, Dh]."""
    return torch.softmax(q @ k.T * scale, dim=-1) @ v


def loop_st_attention(q, k, v, num_frames: int, mode: str, scale: float | None = None) -> torch.Tensor:
    """st_attention by loops over (batch, head, group); q, k, v [B, L, H, Dh] -> float64 [B, L, H, Dh]."""
    q, k, v = (t.detach().to(torch.float64) for t in (q, k, v))
    batch, length, heads, head_dim = q.shape
    n_patch = (length - 1) // num_frames
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            if mode == "joint":
                rows = list(range(length))
                out[b, rows, h] = softmax_attention(q[b, rows, h], k[b, rows, h], v[b, rows, h], scale)
            elif mode == "temporal":
                for n in range(n_patch):
                    rows = [1 + t * n_patch + n for t in range(num_frames)]
                    out[b, rows, h] = softmax_attention(q[b, rows, h], k[b, rows, h], v[b, rows, h], scale)
            elif mode == "spatial":
                cls_sum = torch.zeros(head_dim, dtype=torch.float64)
                for t in range(num_frames):
                    rows = [0] + [1 + t * n_patch + n for n in range(n_patch)]
                    res = softmax_attention(q[b, rows, h], k[b, rows, h], v[b, rows, h], scale)
                    out[b, rows[1:], h] = res[1:]
                    cls_sum += res[0]
                out[b, 0, h] = cls_sum / num_frames
            else:
                raise ValueError(mode)
    return out


def _mha(attn_module, x: torch.Tensor) -> torch.Tensor:
    """Multi-head self-attention of an STAttention's weights over x [G, S, D] (all tokens of a group)."""
    g, s, d = x.shape
    heads = attn_module.num_heads
    qkv = torch.nn.functional.linear(x, attn_module.qkv.weight.double(), attn_module.qkv.bias.double())
    qkv = qkv.reshape(g, s, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # [3, G, H, S, Dh]
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = torch.softmax(q @ k.transpose(-1, -2) * (d // heads) ** -0.5, dim=-1)
    o = (attn @ v).transpose(1, 2).reshape(g, s, d)
    return torch.nn.functional.linear(o, attn_module.proj.weight.double(), attn_module.proj.bias.double())


def _ln(norm, x):
    return torch.nn.functional.layer_norm(x, norm.normalized_shape, norm.weight.double(),
                                          norm.bias.double(), norm.eps)


def _mlp(mlp, x):
    h = torch.nn.functional.gelu(torch.nn.functional.linear(x, mlp.fc1.weight.double(), mlp.fc1.bias.double()))
    return torch.nn.functional.linear(h, mlp.fc2.weight.double(), mlp.fc2.bias.double())


def timesformer_divided_block(block, x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """A DividedBlock's function in TimeSformer's own formulation, float64. x [B, L, D]."""
    x = x.double()
    batch, length, dim = x.shape
    n_patch = (length - 1) // num_frames
    # temporal: 'b (t n) d -> (b n) t d', cls left out
    xt = x[:, 1:].reshape(batch, num_frames, n_patch, dim).permute(0, 2, 1, 3).reshape(-1, num_frames, dim)
    res_t = _mha(block.temporal_attn, _ln(block.temporal_norm1, xt))
    res_t = res_t.reshape(batch, n_patch, num_frames, dim).permute(0, 2, 1, 3).reshape(batch, -1, dim)
    res_t = torch.nn.functional.linear(res_t, block.temporal_fc.weight.double(), block.temporal_fc.bias.double())
    xt = x[:, 1:] + res_t
    # spatial: cls repeated for every frame, 'b (t n) d -> (b t) n d', then the cls results averaged
    init_cls = x[:, :1]
    cls_rep = init_cls.repeat(1, num_frames, 1).reshape(batch * num_frames, 1, dim)
    xs = torch.cat([cls_rep, xt.reshape(batch * num_frames, n_patch, dim)], dim=1)
    res_s = _mha(block.attn, _ln(block.norm1, xs))
    cls_avg = res_s[:, 0].reshape(batch, num_frames, dim).mean(1, keepdim=True)
    res_s = res_s[:, 1:].reshape(batch, num_frames * n_patch, dim)
    x = torch.cat([init_cls, xt], dim=1) + torch.cat([cls_avg, res_s], dim=1)
    return x + _mlp(block.mlp, _ln(block.norm2, x))


def full_attention_joint_block(block, x: torch.Tensor) -> torch.Tensor:
    """A JointBlock's function with one full attention over all tokens, float64. x [B, L, D]."""
    x = x.double()
    x = x + _mha(block.attn, _ln(block.norm1, x))
    return x + _mlp(block.mlp, _ln(block.norm2, x))
