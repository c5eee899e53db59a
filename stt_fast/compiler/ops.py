"""The two kernels the inference program calls, behind one interface per backend.

TorchOps:  PyTorch only (SDPA over regrouped tokens, in-place residual add, F.layer_norm); any device.
TritonOps: the fused Triton kernels, st_attention and add_layer_norm; CUDA (or the interpreter).
ExportOps: what an exported graph should hold: MatMul-Softmax-MatMul attention and native
           LayerNorm, both in float32 whatever the graph's precision (FP16 LayerNorm and softmax
           overflow in transformers), no in-place updates. TensorRT fuses both patterns.
ExportAttentionOps: ExportOps with SDPA, which torch.onnx exports as the ONNX Attention op (opset 23).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stt_fast.kernels import (
    add_layer_norm,
    add_layer_norm_reference,
    st_attention,
    st_attention_reference,
    st_attention_sdpa,
)


class TorchOps:
    name = "torch"

    @staticmethod
    def attention(q, k, v, *, num_frames: int, mode: str) -> torch.Tensor:
        return st_attention_sdpa(q, k, v, num_frames=num_frames, mode=mode)

    @staticmethod
    def add_layer_norm(x, delta, weight, bias, eps: float, cls_period: int = 0):
        """x += delta in place (x is the program's own residual stream), then LayerNorm."""
        if delta is not None:
            if cls_period:
                dim = x.shape[-1]
                x.view(-1, cls_period, dim).narrow(1, 1, cls_period - 1).add_(
                    delta.view(-1, cls_period, dim).narrow(1, 1, cls_period - 1))
            else:
                x += delta
        return x, F.layer_norm(x, x.shape[-1:], weight, bias, eps)


class TritonOps:
    name = "triton"

    @staticmethod
    def attention(q, k, v, *, num_frames: int, mode: str) -> torch.Tensor:
        return st_attention(q, k, v, num_frames=num_frames, mode=mode)

    @staticmethod
    def add_layer_norm(x, delta, weight, bias, eps: float, cls_period: int = 0):
        return add_layer_norm(x, delta, weight, bias, eps, cls_period=cls_period)


class ExportOps:
    name = "export"

    @staticmethod
    def attention(q, k, v, *, num_frames: int, mode: str) -> torch.Tensor:
        return st_attention_reference(q, k, v, num_frames=num_frames, mode=mode)

    @staticmethod
    def add_layer_norm(x, delta, weight, bias, eps: float, cls_period: int = 0):
        # The kernel's reference: out of place, add and LayerNorm in float32 whatever x's precision.
        return add_layer_norm_reference(x, delta, weight, bias, eps, cls_period=cls_period)


class ExportAttentionOps(ExportOps):
    name = "export-attention-op"

    @staticmethod
    def attention(q, k, v, *, num_frames: int, mode: str) -> torch.Tensor:
        return st_attention_sdpa(q, k, v, num_frames=num_frames, mode=mode)


OPS = {ops.name: ops for ops in (TorchOps, TritonOps, ExportOps, ExportAttentionOps)}
