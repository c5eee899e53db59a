"""STTProgram: the inference-only form of an STT, built once from its weights.

Same function as the reference model in eval mode, rewritten for speed:

- BatchNorm folded into the backbone's convolutions; channels_last activations (optional).
- The 1x1 token projection applied as a linear layer over channels_last features, which are already
  in token order ([B*T, g, g, C] = [B, T*N, C]): no transpose copy. Its bias and both position
  embeddings are one precomputed [T*N, D] table.
- q, k and v stay packed: one qkv linear, viewed as [B, L, 3, H, Dh], read by the attention in place.
- proj and temporal_fc (nothing between them) folded into one linear layer.
- Each residual add fused with the LayerNorm after it (ops.add_layer_norm).
- With the Triton op set (CUDA): each backbone convolution + bias + ReLU (+ residual) as one cuDNN launch
  (conv_ops), the 1/255 of uint8 clips folded into conv1's weights, and in half precision fc1 + GELU as
  one cuBLASLt launch (its GELU epilogue, tanh form).
- Last block pruned to what reaches the head: only the cls token leaves the model, so after the last
  block's temporal attention (divided mode) everything runs for the cls row alone: its attention with
  the key and value projections absorbed (cls_attention.py), the output projection, the MLP and the
  final LayerNorm.
- Weights cast once to the program's dtype.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from stt_fast import layout
from stt_fast.config import STTConfig
from stt_fast.inputs import clips_to_float
from stt_fast.model import STT, DividedBlock

from .cls_attention import AbsorbedClsAttention
from .folding import FoldedTrunk, fold_linear_chain
from .ops import OPS


class _Block(nn.Module):
    """The weights of one block, rearranged for the program (names follow the reference's)."""

    def __init__(self, block: nn.Module, last: bool) -> None:
        super().__init__()
        block = copy.deepcopy(block)
        self.divided = isinstance(block, DividedBlock)
        if self.divided:
            self.temporal_norm1 = block.temporal_norm1
            self.temporal_qkv = block.temporal_attn.qkv
            self.temporal_out = fold_linear_chain(block.temporal_attn.proj, block.temporal_fc)
        self.norm1 = block.norm1
        if last:
            self.cls_attn = AbsorbedClsAttention(block.attn.qkv, block.attn.num_heads, block.num_frames,
                                                 block.attn.mode)
        else:
            self.qkv = block.attn.qkv
        self.proj = block.attn.proj
        self.norm2 = block.norm2
        self.fc1 = block.mlp.fc1
        self.fc2 = block.mlp.fc2

    def first_norm(self) -> nn.LayerNorm:
        return self.temporal_norm1 if self.divided else self.norm1


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
        self.backbone = FoldedTrunk(model.backbone, fused=ops == "triton")
        self.fold_uint8_scale = ops == "triton"
        self.fused_gelu = ops == "triton"
        if channels_last:  # weights too, so that cuDNN/oneDNN convert nothing per call
            self.backbone.to(memory_format=torch.channels_last)
        dim = config.embed_dim
        with torch.no_grad():
            proj = model.token_proj
            self.token_weight = nn.Parameter(proj.weight.detach().view(dim, -1).clone())  # [D, C]
            pos = (model.spatial_pos.detach().unsqueeze(1) + model.temporal_pos.detach().unsqueeze(2))[0]
            self.token_pos = nn.Parameter((pos.flatten(0, 1) + proj.bias.detach()).clone())  # [T*N, D]
            self.cls_token = nn.Parameter(model.cls_token.detach().clone())
        depth = len(model.blocks)
        self.blocks = nn.ModuleList(_Block(b, last=i == depth - 1) for i, b in enumerate(model.blocks))
        self.norm = copy.deepcopy(model.norm)
        self.head = copy.deepcopy(model.head)
        self.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.cls_token.dtype

    def _heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """[B, L, parts * D] -> parts views of [B, L, H, Dh]."""
        c = self.config
        return x.unflatten(-1, (parts, c.num_heads, c.head_dim)).unbind(dim=2)

    def _mlp(self, block: _Block, h: torch.Tensor) -> torch.Tensor:
        if self.fused_gelu and h.dtype != torch.float32:
            # fc1 and GELU as one launch: cuBLASLt's GELU epilogue on CUDA. It computes GELU's tanh form, not
            # erf: measured 4.0e-4 relative error of the paper model's logits from that alone (fp32, CPU),
            # within the half-precision tolerance (5e-3) and not float32's (1e-4), hence half precision only.
            rows = h.reshape(-1, h.shape[-1])
            hidden = torch._addmm_activation(block.fc1.bias, rows, block.fc1.weight.t(), use_gelu=True)
            return block.fc2(hidden.view(*h.shape[:-1], hidden.shape[-1]))
        return block.fc2(F.gelu(block.fc1(h)))

    def embed(self, clips: torch.Tensor) -> torch.Tensor:
        c = self.config
        batch = clips.shape[0]
        uint8_scale = self.fold_uint8_scale and clips.dtype == torch.uint8
        if uint8_scale:  # one copy: dtype and memory format at once; the 1/255 is in conv1's weights
            frames = clips.flatten(0, 1).to(self.dtype, memory_format=(
                torch.channels_last if self.channels_last else torch.contiguous_format))
        else:
            frames = clips_to_float(clips, self.dtype).flatten(0, 1)
            if self.channels_last:  # .to, not .contiguous(memory_format): the same copy, and fake CUDA takes it
                frames = frames.to(memory_format=torch.channels_last)
        features = self.backbone(frames, uint8_scale=uint8_scale)  # [B*T, C, g, g]
        features = features.permute(0, 2, 3, 1).reshape(batch, c.num_frames * c.num_patches, -1)
        patches = F.linear(features, self.token_weight).add_(self.token_pos)
        return layout.assemble_tokens(self.cls_token, patches.unflatten(1, (c.num_frames, c.num_patches)))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        c, ops = self.config, self.ops
        frames, length, eps = c.num_frames, c.num_tokens, c.layer_norm_eps
        x = self.embed(clips)
        first = self.blocks[0].first_norm()
        x, h = ops.add_layer_norm(x, None, first.weight, first.bias, eps)
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            if block.divided:
                q, k, v = self._heads(block.temporal_qkv(h), 3)
                t = ops.attention(q, k, v, num_frames=frames, mode="temporal").flatten(2)
                x, h = ops.add_layer_norm(x, block.temporal_out(t), block.norm1.weight, block.norm1.bias, eps,
                                          cls_period=length)
            mode = "spatial" if block.divided else "joint"
            if not last:
                q, k, v = self._heads(block.qkv(h), 3)
                a = ops.attention(q, k, v, num_frames=frames, mode=mode).flatten(2)
                x, h = ops.add_layer_norm(x, block.proj(a), block.norm2.weight, block.norm2.bias, eps)
                nxt = self.blocks[i + 1].first_norm()
                x, h = ops.add_layer_norm(x, self._mlp(block, h), nxt.weight, nxt.bias, eps)
                continue
            # Last block: only the cls row goes on to the head.
            a = block.cls_attn(h)  # [B, D]
            x_cls, h_cls = ops.add_layer_norm(x.select(1, 0), block.proj(a), block.norm2.weight, block.norm2.bias,
                                              eps)
            _, h_cls = ops.add_layer_norm(x_cls, self._mlp(block, h_cls), self.norm.weight, self.norm.bias, eps)
            return self.head(h_cls).float()
        raise AssertionError("unreachable: the last block returns")
