"""STT, the reference model: the numerical ground truth of every fast backend.

Data flow (docs/design.md):

    clips [B, T, 3, H, W] (float in [0, 1], or uint8)
    -> ResNet-18 trunk per frame              [B*T, 256, 7, 7]
    -> 1x1 conv to D, + spatial/temporal pos  [B, T, N, D]
    -> cls token in front                     [B, L, D], L = 1 + T*N   (layout: stt_fast.layout)
    -> depth x block
         divided: x[patches] += temporal_fc(attn_temporal(LN(x)));  x += attn_spatial(LN(x));
                  x += MLP(LN(x))
         joint:   x += attn_joint(LN(x));  x += MLP(LN(x))
    -> LayerNorm, cls token, linear           logits [B, K] float32

Attention is stt_fast.kernels.st_attention_reference: explicit matmul, float32 softmax, matmul, on
views of one packed qkv projection [B, L, 3, H, Dh]. Stochastic depth and dropout act in training only.
"""

from __future__ import annotations

import torch
from torch import nn

from stt_fast.kernels.st_attention_reference import st_attention_reference

from . import layout
from .backbone import ResNet18Trunk
from .config import STTConfig
from .inputs import check_clips, clips_to_float


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a sample's residual branch with probability p."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class STAttention(nn.Module):
    """Multi-head attention of one grouping ("temporal", "spatial" or "joint") over [B, L, D] tokens.

    qkv is one linear layer whose output, viewed as [B, L, 3, H, Dh], holds q, k and v side by side;
    the attention reads them as strided views.
    """

    def __init__(self, dim: int, num_heads: int, mode: str, qkv_bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.mode = mode
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x [B, L, D] -> [B, L, D]; for "temporal" the cls row carries only proj's bias."""
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = qkv.unbind(dim=2)
        out = st_attention_reference(q, k, v, num_frames=num_frames, mode=self.mode)
        return self.proj_drop(self.proj(out.flatten(2)))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DividedBlock(nn.Module):
    """Temporal attention (patch tokens only, through temporal_fc), spatial attention, MLP."""

    def __init__(self, config: STTConfig, drop_path: float) -> None:
        super().__init__()
        dim, eps = config.embed_dim, config.layer_norm_eps
        self.num_frames = config.num_frames
        self.temporal_norm1 = nn.LayerNorm(dim, eps=eps)
        self.temporal_attn = STAttention(dim, config.num_heads, "temporal", config.qkv_bias, config.dropout)
        self.temporal_fc = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = STAttention(dim, config.num_heads, "spatial", config.qkv_bias, config.dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, config.mlp_hidden_dim, config.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        temporal = self.temporal_attn(self.temporal_norm1(x), self.num_frames)
        temporal = self.temporal_fc(temporal[:, 1:])  # the cls token takes no part
        x = torch.cat([x[:, :1], x[:, 1:] + self.drop_path(temporal)], dim=1)
        x = x + self.drop_path(self.attn(self.norm1(x), self.num_frames))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class JointBlock(nn.Module):
    """One attention over all 1 + T*N tokens, then the MLP."""

    def __init__(self, config: STTConfig, drop_path: float) -> None:
        super().__init__()
        dim, eps = config.embed_dim, config.layer_norm_eps
        self.num_frames = config.num_frames
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = STAttention(dim, config.num_heads, "joint", config.qkv_bias, config.dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, config.mlp_hidden_dim, config.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), self.num_frames))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class STT(nn.Module):
    """The Spatio-Temporal Transformer: clips [B, T, 3, H, W] -> logits [B, num_classes] (float32)."""

    def __init__(self, config: STTConfig | None = None) -> None:
        super().__init__()
        config = STTConfig() if config is None else config
        if not isinstance(config, STTConfig):
            raise ValueError(f"config must be an STTConfig, got {type(config).__name__}")
        self.config = config
        dim = config.embed_dim
        self.backbone = ResNet18Trunk(config.backbone_width)
        self.token_proj = nn.Conv2d(config.backbone_channels, dim, kernel_size=1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.spatial_pos = nn.Parameter(torch.zeros(1, config.num_patches, dim))
        self.temporal_pos = nn.Parameter(torch.zeros(1, config.num_frames, dim))
        block = DividedBlock if config.attention == "divided" else JointBlock
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(block(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.head = nn.Linear(dim, config.num_classes)
        self._init_transformer()

    def _init_transformer(self) -> None:
        # ViT/TimeSformer initialisation; the backbone keeps torchvision's.
        for p in (self.cls_token, self.spatial_pos, self.temporal_pos):
            nn.init.trunc_normal_(p, std=0.02)
        for m in [*self.blocks.modules(), self.head]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """The per-frame half: float frames [F, 3, H, W] -> backbone features [F, C, g, g]. A frame's
        features do not depend on the clip it belongs to (the timeline computes each frame's once)."""
        return self.backbone(frames)

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """The per-clip half: features [B, T, C, g, g] of each clip's frames -> logits [B, K] float32."""
        frames = features.shape[1]
        tokens = self.token_proj(features.flatten(0, 1))  # [B*T, D, g, g]
        patches = tokens.flatten(2).transpose(1, 2).unflatten(0, (-1, frames))  # [B, T, N, D]
        patches = patches + self.spatial_pos.unsqueeze(1) + self.temporal_pos.unsqueeze(2)
        x = layout.assemble_tokens(self.cls_token, patches)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0])).float()

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        check_clips(clips, self.config)
        frames = clips_to_float(clips, self.cls_token.dtype)
        features = self.frame_features(frames.flatten(0, 1))
        return self.classify_features(features.unflatten(0, (clips.shape[0], clips.shape[1])))
