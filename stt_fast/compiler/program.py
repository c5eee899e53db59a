"""STTProgram: the inference-only form of an STT, built once from its weights.

Same function as the reference model in eval mode, rewritten for speed:

- BatchNorm folded into the backbone's convolutions; channels_last activations (optional).
- The 1x1 token projection applied as a linear layer over channels_last features, which are already
  in token order ([B*T, g, g, C] = [B, T*N, C]): no transpose copy. Its bias and both position
  embeddings are one precomputed [L, D] table, with the cls token as its row 0.
- q, k and v stay packed: one qkv linear, viewed as [B, L, 3, H, Dh], read by the attention in place.
- proj and temporal_fc (nothing between them) folded into one linear layer.
- Every linear layer is one ops.linear: with the LayerNorm before it, the GELU after it and the residual
  add (each where the block has one) as one call; the Triton op set runs it as one launch
  (stt_fast.kernels.fused_linear: LayerNorm in the prologue, the rest in the epilogue), the torch op sets
  as PyTorch's separate ops. The token projection writes the [B, L, D] tokens with the cls token and the
  position table as its bias table (ops.embed_tokens).
- With the Triton op set (CUDA): each backbone convolution + bias + ReLU (+ residual) as one cuDNN launch
  (conv_ops), the 1/255 of uint8 clips folded into conv1's weights.
- Last block pruned to what reaches the head: only the cls token leaves the model, so after the last
  block's temporal attention (divided mode) everything runs for the cls row alone: its attention with
  the key and value projections absorbed (ops.cls_attention: one kernel with the Triton op set), the
  output projection, the MLP and the final LayerNorm with the head.
- Weights cast once to the program's dtype.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from stt_fast.config import STTConfig
from stt_fast.inputs import clips_to_float
from stt_fast.model import STT, DividedBlock

from .folding import FoldedTrunk, fold_linear_chain
from .ops import OPS


def _with_bias(linear: nn.Linear) -> nn.Linear:
    """linear with a zero bias where it had none (qkv_bias=False): the fused kernels take one always."""
    if linear.bias is None:
        linear.bias = nn.Parameter(linear.weight.new_zeros(linear.out_features))
    return linear


class _Block(nn.Module):
    """The weights of one block, rearranged for the program (names follow the reference's)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        block = copy.deepcopy(block)
        self.divided = isinstance(block, DividedBlock)
        self.mode = block.attn.mode  # "spatial" (divided) or "joint"
        if self.divided:
            self.temporal_norm1 = block.temporal_norm1
            self.temporal_qkv = _with_bias(block.temporal_attn.qkv)
            self.temporal_out = fold_linear_chain(block.temporal_attn.proj, block.temporal_fc)
        self.norm1 = block.norm1
        self.qkv = _with_bias(block.attn.qkv)
        self.proj = block.attn.proj
        self.norm2 = block.norm2
        self.fc1 = block.mlp.fc1
        self.fc2 = block.mlp.fc2


class STTProgram(nn.Module):
    """clips [B, T, 3, H, W] (validated, on the program's device) -> logits [B, K] float32."""

    def __init__(self, model: STT, *, ops: str = "torch", channels_last: bool = True) -> None:
        """ops: "torch", "triton", "export" or "export-attention-op" (stt_fast.compiler.ops)."""
        super().__init__()
        config: STTConfig = model.config
        self.config = config
        self.ops = OPS[ops]
        self.channels_last = channels_last
        # the Triton op set (CUDA) runs each convolution + bias + ReLU (+ residual) as one cuDNN launch and
        # folds the 1/255 of uint8 clips into conv1; the other op sets (the torch fallback, the exports,
        # whose graphs must hold standard ops only) keep PyTorch's separate passes
        self.fused = ops == "triton"
        self.backbone = FoldedTrunk(model.backbone, fused=self.fused)
        if channels_last:  # weights too, so that cuDNN/oneDNN convert nothing per call
            self.backbone.to(memory_format=torch.channels_last)
        dim = config.embed_dim
        with torch.no_grad():
            proj = model.token_proj
            self.token_weight = nn.Parameter(proj.weight.detach().view(dim, -1).clone())  # [D, C]
            pos = (model.spatial_pos.detach().unsqueeze(1) + model.temporal_pos.detach().unsqueeze(2))[0]
            # [L, D] in the token layout: row 0 the cls token, then the projection's bias + both position
            # embeddings of each patch token
            self.token_table = nn.Parameter(torch.cat([model.cls_token.detach().view(1, dim),
                                                       pos.flatten(0, 1) + proj.bias.detach()]))
        self.blocks = nn.ModuleList(_Block(b) for b in model.blocks)
        self.norm = copy.deepcopy(model.norm)
        self.head = copy.deepcopy(model.head)
        self.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.token_table.dtype

    def _heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """[B, L, parts * D] -> parts views of [B, L, H, Dh]."""
        c = self.config
        return x.unflatten(-1, (parts, c.num_heads, c.head_dim)).unbind(dim=2)

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """The per-frame half: frames [F, 3, H, W] (uint8 0-255 or float in [0, 1]) -> backbone features
        [F, N, C] in token order. A frame's features do not depend on the clip it is in (stt_fast.timeline
        computes each frame's once for all the windows that hold it)."""
        uint8_scale = self.fused and frames.dtype == torch.uint8
        if uint8_scale:  # one copy: dtype and memory format at once; the 1/255 is in conv1's weights
            frames = frames.to(self.dtype, memory_format=(
                torch.channels_last if self.channels_last else torch.contiguous_format))
        else:
            frames = clips_to_float(frames, self.dtype)
            if self.channels_last:  # .to, not .contiguous(memory_format): the same copy, and fake CUDA takes it
                frames = frames.to(memory_format=torch.channels_last)
        features = self.backbone(frames, uint8_scale=uint8_scale)  # [F, C, g, g]
        # channels_last features are already in token order ([F, g, g, C] = [F, N, C]): a view
        return features.permute(0, 2, 3, 1).flatten(1, 2)

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """The per-clip half: the frame features of B clips [B, T*N, C] -> logits [B, K] float32."""
        c = self.config
        x = self.ops.embed_tokens(features, self.token_weight, self.token_table, num_frames=c.num_frames)
        return self._blocks(x)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        features = self.frame_features(clips.flatten(0, 1))
        return self.classify_features(features.reshape(clips.shape[0], -1, features.shape[-1]))

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """tokens [B, L, D] -> logits [B, K] float32."""
        c, ops = self.config, self.ops
        frames, length = c.num_frames, c.num_tokens
        for i, block in enumerate(self.blocks):
            if block.divided:
                q, k, v = self._heads(ops.linear(x, block.temporal_qkv, norm=block.temporal_norm1), 3)
                t = ops.attention(q, k, v, num_frames=frames, mode="temporal").flatten(2)
                x = ops.linear(t, block.temporal_out, residual=x, cls_period=length)
            if i < len(self.blocks) - 1:
                q, k, v = self._heads(ops.linear(x, block.qkv, norm=block.norm1), 3)
                a = ops.attention(q, k, v, num_frames=frames, mode=block.mode).flatten(2)
                x = ops.linear(a, block.proj, residual=x)
                x = ops.linear(ops.linear(x, block.fc1, norm=block.norm2, gelu=True), block.fc2, residual=x)
                continue
            # Last block: only the cls row goes on to the head.
            a = ops.cls_attention(x, block.norm1, block.qkv, num_heads=c.num_heads, num_frames=frames,
                                  mode=block.mode)  # [B, D]
            x_cls = ops.linear(a, block.proj, residual=x.select(1, 0))
            x_cls = ops.linear(ops.linear(x_cls, block.fc1, norm=block.norm2, gelu=True), block.fc2, residual=x_cls)
            return ops.linear(x_cls, self.head, norm=self.norm, out_dtype=torch.float32)
        raise AssertionError("unreachable: the last block returns")
