"""Compile-time rewrites of the weights, exact in real arithmetic (computed in float64).

- BatchNorm (eval) folded into the convolution before it:
      W' = W * g / sqrt(var + eps),   b' = (b - mean) * g / sqrt(var + eps) + beta
- Two linear layers with nothing between them made one (STT's temporal branch: proj, then temporal_fc):
      second(first(x)) = x (W2 W1)^T + (W2 b1 + b2)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from stt_fast.backbone import BasicBlock, ResNet18Trunk


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


class FoldedBasicBlock(nn.Module):
    def __init__(self, block: BasicBlock) -> None:
        super().__init__()
        self.conv1 = fold_conv_bn(block.conv1, block.bn1)
        self.conv2 = fold_conv_bn(block.conv2, block.bn2)
        self.downsample = None if block.downsample is None else fold_conv_bn(*block.downsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv2(torch.relu_(self.conv1(x)))
        return torch.relu_(out.add_(identity))


class FoldedTrunk(nn.Module):
    """ResNet18Trunk with every BatchNorm folded away: same function in eval mode, fewer passes."""

    def __init__(self, trunk: ResNet18Trunk) -> None:
        super().__init__()
        trunk = copy.deepcopy(trunk).eval()
        self.conv1 = fold_conv_bn(trunk.conv1, trunk.bn1)
        self.maxpool = trunk.maxpool
        self.layers = nn.Sequential(*(FoldedBasicBlock(b) for layer in (trunk.layer1, trunk.layer2, trunk.layer3)
                                      for b in layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.maxpool(torch.relu_(self.conv1(x))))
