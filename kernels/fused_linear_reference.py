"""Plain-PyTorch reference of fused_linear (the Triton kernel beside it).

    a'   = LayerNorm(a) * norm_weight + norm_bias                 (norm given; statistics in float32)
    y    = a' @ weight^T + bias                                    (bias [N], or a table [P, N]: row r % P)
    y    = GELU(y)  (erf form)                                     (gelu)
    out  = residual + y   (rows r with r % cls_period == 0 keep residual)   (residual given)

tokens = P > 0: the output has rows [B * P] in the token layout (stt_fast.layout) and a has B * (P - 1)
rows: output row r takes a row r - r // P - 1, and the cls slot of each clip (r % P == 0) takes none
(its y is the table's row 0 alone: the cls token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_linear_reference(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                           norm: tuple[torch.Tensor, torch.Tensor, float] | None = None, gelu: bool = False,
                           residual: torch.Tensor | None = None, cls_period: int = 0, tokens: int = 0,
                           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """a [..., K] (tokens: [B * (P - 1), K]); weight [N, K] -> [..., N] (tokens: [B * P, N]) in out_dtype
    (default a's). Every step in float32 or wider; the normalised rows are rounded to a's dtype before the
    product, as a separate LayerNorm would leave them."""
    acc = torch.promote_types(a.dtype, torch.float32)
    out_dtype = out_dtype or a.dtype
    x = a.to(acc)
    if norm is not None:
        norm_weight, norm_bias, eps = norm
        x = F.layer_norm(x, x.shape[-1:], norm_weight.to(acc), norm_bias.to(acc), eps).to(a.dtype).to(acc)
    y = x @ weight.to(acc).t()
    if tokens:
        clips = y.shape[0] // (tokens - 1)
        y = torch.cat([y.new_zeros(clips, 1, y.shape[-1]), y.view(clips, tokens - 1, -1)], dim=1).flatten(0, 1)
    if bias is not None:
        b = bias.to(acc)
        y = y + (b.repeat(y.shape[0] // b.shape[0], 1) if b.dim() == 2 else b)
    if gelu:
        y = F.gelu(y)
    if residual is not None:
        y = residual.to(acc) + (without_cls_rows(y, cls_period) if cls_period else y)
    return y.to(out_dtype)


def without_cls_rows(y: torch.Tensor, period: int) -> torch.Tensor:
    """y [..., N] with the rows r of r % period == 0 (each clip's cls row) set to zero, out of place."""
    rows = torch.arange(y.numel() // y.shape[-1], device=y.device).view(y.shape[:-1])
    return y * (rows % period != 0).unsqueeze(-1)
