"""Plain-PyTorch reference of add_layer_norm (the Triton kernel beside it).

    y = x + delta                 (rows r with r % cls_period == 0 keep x: the cls token of each clip)
    z = (y - mean(y)) / sqrt(var(y) + eps) * weight + bias      over the last dimension, in float32
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_layer_norm_reference(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                             bias: torch.Tensor, eps: float = 1e-6, *,
                             cls_period: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta [..., D]; weight, bias [D] -> (y, z), both [..., D] in x's dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    y = x.to(acc)
    if delta is not None:
        d = delta.to(acc)
        if cls_period:
            rows = torch.arange(x.numel() // x.shape[-1], device=x.device).view(x.shape[:-1])
            d = d * (rows % cls_period != 0).unsqueeze(-1)
        y = y + d
    z = F.layer_norm(y, y.shape[-1:], weight.to(acc), bias.to(acc), eps)
    return y.to(x.dtype), z.to(x.dtype)
