"""The two kernels the inference program calls, behind one interface per backend.

TorchOps: PyTorch only (SDPA over regrouped tokens, in-place residual add, F.layer_norm); any device.
TritonOps: the fused Triton kernels, st_attention and add_layer_norm; CUDA (or the interpreter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stt_fast.kernels import add_layer_norm, st_attention, st_attention_sdpa


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
                x.view(-1, cls_period, dim)[:, 1:] += delta.view(-1, cls_period, dim)[:, 1:]
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
