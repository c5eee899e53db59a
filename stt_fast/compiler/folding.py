"""Compile-time rewrites of the weights, exact in real arithmetic (computed in float64).

- BatchNorm (eval) folded into the convolution before it:
      W' = W * g / sqrt(var + eps),   b' = (b - mean) * g / sqrt(var + eps) + beta
- Two linear layers with nothing between them made one (STT's temporal branch: proj, then temporal_fc):
      second(first(x)) = x (W2 W1)^T + (W2 b1 + b2)
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from stt_fast.backbone import BasicBlock, ResNet18Trunk
from stt_fast.kernels import max_pool2d

from .conv_ops import conv_bias_relu


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv (with bias) computing bn(conv(x)) with bn in eval mode."""
    factor = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * factor.view(-1, 1, 1, 1)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(factor)
    bias = (bias - bn.running_mean.double()) * factor + bn.bias.double()
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
    folded.weight.copy_(weight)
    folded.bias.copy_(bias)
    return folded


@torch.no_grad()
def fold_linear_chain(first: nn.Linear, second: nn.Linear) -> nn.Linear:
    """A new linear layer computing second(first(x))."""
    w1, w2 = first.weight.double(), second.weight.double()
    b1 = first.bias.double() if first.bias is not None else torch.zeros(w1.shape[0], dtype=torch.float64)
    b2 = second.bias.double() if second.bias is not None else torch.zeros(w2.shape[0], dtype=torch.float64)
    fused = nn.Linear(first.in_features, second.out_features, device=w1.device, dtype=first.weight.dtype)
    fused.weight.copy_(w2 @ w1)
    fused.bias.copy_(w2 @ b1 + b2)
    return fused


def _conv_relu(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None, fused: bool) -> torch.Tensor:
    """relu(conv(x) + residual): one fused launch (conv_ops) or PyTorch's separate passes."""
    if fused:
        return conv_bias_relu(x, conv.weight, conv.bias, list(conv.stride), list(conv.padding), residual)
    out = conv(x)
    return torch.relu_(out if residual is None else out.add_(residual))


class FoldedBasicBlock(nn.Module):
    def __init__(self, block: BasicBlock, fused: bool = False) -> None:
        super().__init__()
        self.fused = fused
        self.conv1 = fold_conv_bn(block.conv1, block.bn1)
        self.conv2 = fold_conv_bn(block.conv2, block.bn2)
        self.downsample = None if block.downsample is None else fold_conv_bn(*block.downsample)
        if fused and self.downsample is not None:
            # relu(conv2(y) + b2 + (W_ds x + b_ds)): the shortcut's bias joins conv2's, so that the shortcut is
            # one bias-free convolution (PyTorch runs a biased one as two kernels) and conv2 + add + ReLU one
            with torch.no_grad():
                self.conv2.bias.add_(self.downsample.bias)
                self.downsample.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return _conv_relu(self.conv2, _conv_relu(self.conv1, x, None, self.fused), identity, self.fused)


class FoldedTrunk(nn.Module):
    """ResNet18Trunk with every BatchNorm folded away: same function in eval mode, fewer passes.

    fused: each convolution + bias + ReLU (+ the block's residual) as one launch (conv_ops.conv_bias_relu).
    forward(x, uint8_scale=True) takes frames still in 0-255 (uint8 converted, not divided): conv1 then uses
    its weights divided by 255 (conv1_weight_255), so the 1/255 of uint8 clips costs no pass of its own."""

    def __init__(self, trunk: ResNet18Trunk, fused: bool = False) -> None:
        super().__init__()
        trunk = copy.deepcopy(trunk).eval()
        self.fused = fused
        self.conv1 = fold_conv_bn(trunk.conv1, trunk.bn1)
        with torch.no_grad():
            self.conv1_weight_255 = nn.Parameter(self.conv1.weight.detach().double().div(255).to(
                self.conv1.weight.dtype))
        self.maxpool = trunk.maxpool
        self.layers = nn.Sequential(*(FoldedBasicBlock(b, fused) for layer in (trunk.layer1, trunk.layer2,
                                                                               trunk.layer3) for b in layer))

    def forward(self, x: torch.Tensor, uint8_scale: bool = False) -> torch.Tensor:
        conv1 = self.conv1
        if uint8_scale:
            stem = (conv_bias_relu(x, self.conv1_weight_255, conv1.bias, list(conv1.stride), list(conv1.padding))
                    if self.fused else
                    torch.relu_(F.conv2d(x, self.conv1_weight_255, conv1.bias, conv1.stride, conv1.padding)))
        else:
            stem = _conv_relu(conv1, x, None, self.fused)
        # the Triton op set's max pool writes no indices (PyTorch's CUDA one always does: 4x the output's bytes)
        pool = self.maxpool
        pooled = max_pool2d(stem, pool.kernel_size, pool.stride, pool.padding) if self.fused else pool(stem)
        return self.layers(pooled)
