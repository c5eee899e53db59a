"""The operations the inference program is written in, behind one interface per backend.

    embed_tokens(features, weight, table)      the token projection into the [B, L, D] token layout
    linear(a, layer, norm=, gelu=, residual=)  LayerNorm -> linear -> GELU -> residual add, each optional
    attention(q, k, v, mode)                    the spatio-temporal attention
    cls_attention(x, norm, qkv, mode)          the last block's attention for the cls row alone

TorchOps:  PyTorch only (SDPA over regrouped tokens, the residual added in place, F.layer_norm); any device.
TritonOps: the Triton kernels: fused_linear (each linear with its neighbours: one launch), st_attention,
           cls_attention; CUDA (or the interpreter).
ExportOps: what an exported graph should hold: MatMul-Softmax-MatMul attention and native LayerNorm, both
           in float32 whatever the graph's precision (FP16 LayerNorm and softmax overflow in transformers),
           no in-place updates. TensorRT fuses both patterns.
ExportAttentionOps: ExportOps with SDPA, which torch.onnx exports as the ONNX Attention op (opset 23).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stt_fast import layout
from stt_fast.kernels import (
    cls_attention,
    fused_linear,
    st_attention,
    st_attention_reference,
    st_attention_sdpa,
)
from stt_fast.kernels.fused_linear_reference import without_cls_rows

from .cls_attention import absorbed_cls_attention


def _tokens(patches: torch.Tensor, table: torch.Tensor, num_frames: int) -> torch.Tensor:
    """patches [B, T*N, D] (projected, without bias) + the table [L, D] -> tokens [B, L, D]."""
    patches = patches + table.narrow(0, 1, table.shape[0] - 1)
    return layout.assemble_tokens(table.narrow(0, 0, 1).unsqueeze(0), patches.unflatten(1, (num_frames, -1)))


class TorchOps:
    name = "torch"

    @staticmethod
    def embed_tokens(features, weight, table, *, num_frames: int) -> torch.Tensor:
        return _tokens(F.linear(features, weight), table, num_frames)

    @staticmethod
    def linear(a, layer: nn.Linear, *, norm: nn.LayerNorm | None = None, gelu: bool = False, residual=None,
               cls_period: int = 0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """With a residual, the result is added to it in place (the program's own residual stream) and the
        residual returned."""
        if norm is not None:
            a = F.layer_norm(a, a.shape[-1:], norm.weight, norm.bias, norm.eps)
        y = F.linear(a, layer.weight, layer.bias)
        if gelu:
            y = F.gelu(y)
        if residual is None:
            return y if out_dtype is None else y.to(out_dtype)
        if cls_period:
            dim = residual.shape[-1]
            residual.view(-1, cls_period, dim).narrow(1, 1, cls_period - 1).add_(
                y.view(-1, cls_period, dim).narrow(1, 1, cls_period - 1))
        else:
            residual += y
        return residual

    @staticmethod
    def attention(q, k, v, *, num_frames: int, mode: str) -> torch.Tensor:
        return st_attention_sdpa(q, k, v, num_frames=num_frames, mode=mode)

    @staticmethod
    def cls_attention(x, norm: nn.LayerNorm, qkv: nn.Linear, *, num_heads: int, num_frames: int,
                      mode: str) -> torch.Tensor:
        h = F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)
        return absorbed_cls_attention(h, qkv.weight, qkv.bias, num_heads=num_heads, num_frames=num_frames, mode=mode)


class TritonOps:
    name = "triton"

    @staticmethod
    def embed_tokens(features, weight, table, *, num_frames: int) -> torch.Tensor:
        length = table.shape[0]
        return fused_linear(features.flatten(0, 1), weight, table, tokens=length).view(features.shape[0], length, -1)

    @staticmethod
    def linear(a, layer: nn.Linear, *, norm: nn.LayerNorm | None = None, gelu: bool = False, residual=None,
               cls_period: int = 0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        stats = None if norm is None else (norm.weight, norm.bias, norm.eps)
        return fused_linear(a, layer.weight, layer.bias, norm=stats, gelu=gelu, residual=residual,
                            cls_period=cls_period, out_dtype=out_dtype)

    @staticmethod
    def attention(q, k, v, *, num_frames: int, mode: str) -> torch.Tensor:
        return st_attention(q, k, v, num_frames=num_frames, mode=mode)

    @staticmethod
    def cls_attention(x, norm: nn.LayerNorm, qkv: nn.Linear, *, num_heads: int, num_frames: int,
                      mode: str) -> torch.Tensor:
        return cls_attention(x, norm.weight, norm.bias, norm.eps, qkv.weight, qkv.bias, num_heads=num_heads,
                             num_frames=num_frames, mode=mode)


def _layer_norm_float32(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    acc = torch.promote_types(x.dtype, torch.float32)
    return F.layer_norm(x.to(acc), x.shape[-1:], norm.weight.to(acc), norm.bias.to(acc), norm.eps).to(x.dtype)


class ExportOps:
    name = "export"
    embed_tokens = TorchOps.embed_tokens

    @staticmethod
    def linear(a, layer: nn.Linear, *, norm: nn.LayerNorm | None = None, gelu: bool = False, residual=None,
               cls_period: int = 0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        # Out of place; the LayerNorm and the residual add in float32 whatever a's precision.
        if norm is not None:
            a = _layer_norm_float32(a, norm)
        y = F.linear(a, layer.weight, layer.bias)
        if gelu:
            y = F.gelu(y)
        if residual is not None:
            acc = torch.promote_types(y.dtype, torch.float32)
            y = y.to(acc)
            y = (residual.to(acc) + (without_cls_rows(y, cls_period) if cls_period else y)).to(residual.dtype)
        return y if out_dtype is None else y.to(out_dtype)

    @staticmethod
    def attention(q, k, v, *, num_frames: int, mode: str) -> torch.Tensor:
        return st_attention_reference(q, k, v, num_frames=num_frames, mode=mode)

    @staticmethod
    def cls_attention(x, norm: nn.LayerNorm, qkv: nn.Linear, *, num_heads: int, num_frames: int,
                      mode: str) -> torch.Tensor:
        return absorbed_cls_attention(_layer_norm_float32(x, norm), qkv.weight, qkv.bias, num_heads=num_heads,
                                      num_frames=num_frames, mode=mode)


class ExportAttentionOps(ExportOps):
    name = "export-attention-op"

    @staticmethod
    def attention(q, k, v, *, num_frames: int, mode: str) -> torch.Tensor:
        return st_attention_sdpa(q, k, v, num_frames=num_frames, mode=mode)


OPS = {ops.name: ops for ops in (TorchOps, TritonOps, ExportOps, ExportAttentionOps)}
