"""Convolution + bias + ReLU (+ a residual added before the ReLU) as one launch: cuDNN's fused
convolution-bias-activation, behind the project's own torch.library op.

    conv_bias_relu(x, w, b, residual) = relu(conv2d(x, w, b) + residual)     (residual optional)

PyTorch's own path runs a convolution with a bias as two kernels (cuDNN's convolution, then the bias) and
the ReLU and the residual add as two more. On CUDA this op is one cuDNN call (torch.cudnn_convolution_relu,
torch.cudnn_convolution_add_relu); elsewhere, and as the reference, the plain PyTorch ops. It is an op of
its own (torch.ops.stt_fast.conv_bias_relu, with a fake implementation) because a CPU-only PyTorch cannot
run the cuDNN ops on fake CUDA tensors ("Torch not compiled with CUDA enabled"), so the launch plan and the
fake-CUDA hot-path checks see one launch where a GPU runs one. The fused route is checked against the
unfused one on the device by `stt-fast selftest`; a failure there makes backend="auto" fall back to
"torch", which runs the unfused ops.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F


def conv_bias_relu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: list[int],
                             padding: list[int], residual: torch.Tensor | None = None) -> torch.Tensor:
    """relu(conv2d(x, weight, bias) + residual), in PyTorch ops: x [N, C, H, W] -> [N, K, H', W']."""
    out = F.conv2d(x, weight, bias, stride, padding)
    if residual is not None:
        out = out.add_(residual)
    return torch.relu_(out)


_UNFUSED: set[tuple] = set()  # (input channels, output channels, kernel, dtype) cuDNN had no fused engine for


@torch.library.custom_op("stt_fast::conv_bias_relu", mutates_args=())
def conv_bias_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: list[int], padding: list[int],
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """One cuDNN launch on CUDA; the reference elsewhere, and where cuDNN finds no fused engine for the shape
    (the 3-channel stem may have none): that convolution then runs unfused, logged once, instead of failing
    the whole program and dropping it to the torch backend."""
    if x.device.type != "cuda":
        return conv_bias_relu_reference(x, weight, bias, stride, padding, residual)
    return fused_or_unfused(x, weight, bias, stride, padding, residual)


def fused_or_unfused(x, weight, bias, stride, padding, residual, relu=None, add_relu=None) -> torch.Tensor:
    """cuDNN's fused call (relu, add_relu: torch.cudnn_convolution_relu / _add_relu), or the unfused ops for a
    shape cuDNN has no fused engine for (remembered, so that it is asked once)."""
    shape = (x.shape[1], weight.shape[0], tuple(weight.shape[2:]), x.dtype)
    if shape in _UNFUSED:
        return conv_bias_relu_reference(x, weight, bias, stride, padding, residual)
    try:
        if residual is None:
            return (relu or torch.cudnn_convolution_relu)(x, weight, bias, stride, padding, [1, 1], 1)
        return (add_relu or torch.cudnn_convolution_add_relu)(x, weight, residual, 1.0, bias, stride, padding,
                                                              [1, 1], 1)
    except RuntimeError as e:  # cuDNN: no engine for this fused graph
        _UNFUSED.add(shape)
        logging.getLogger(__name__).warning("stt_fast: cuDNN has no fused conv+bias+ReLU for %s channels -> %s "
                                            "(%s): that convolution runs unfused", shape[0], shape[1],
                                            str(e).splitlines()[0][:200])
        return conv_bias_relu_reference(x, weight, bias, stride, padding, residual)


@conv_bias_relu.register_fake
def _(x, weight, bias, stride, padding, residual=None):
    out = conv_bias_relu_reference(x, weight, bias, stride, padding, residual)
    # cuDNN's fused ops write channels_last output for channels_last input and weights (PyTorch asks cuDNN
    # for the memory format); a CPU-only PyTorch's meta convolution cannot ask and says contiguous, which
    # would put a copy in the launch plan that no GPU makes
    channels_last = all(t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) for t in (x, weight))
    return torch.empty_like(out, memory_format=torch.channels_last) if channels_last else out
