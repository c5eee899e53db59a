"""STTConfig: every hyper-parameter of the model, and the named presets.

The defaults are the paper's configuration (docs/model.md): 16 frames of 112 x 112, a ResNet-18
trunk (conv1..layer3), D = 512, depth 4, 8 heads of 64, MLP ratio 4, divided attention.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

ATTENTION_VARIANTS = ("divided", "joint")

# Index order used by the data sets (DFEW / AFEW) and every output of the project.
EMOTIONS = ("Happy", "Sad", "Neutral", "Angry", "Surprise", "Disgust", "Fear")

# conv1, maxpool, layer2 and layer3 each halve the resolution (kernel/stride/padding chosen so that
# every stage gives ceil(H / 2)), so a 112 x 112 frame becomes a 7 x 7 grid.
BACKBONE_DOWNSAMPLING_STAGES = 4


@dataclass(frozen=True)
class STTConfig:
    """Hyper-parameters of STT. Frozen so that a config can key caches and travel in checkpoints."""

    num_frames: int = 16
    image_size: int = 112
    num_classes: int = 7
    embed_dim: int = 512
    depth: int = 4
    num_heads: int = 8
    mlp_ratio: float = 4.0
    attention: str = "divided"
    backbone_width: int = 64  # channels of ResNet-18's conv1 / layer1; layer3 has 4x this
    drop_path_rate: float = 0.1  # stochastic depth, rising linearly to this over the blocks
    dropout: float = 0.0  # on attention probabilities and projections, training only
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        positive = ("num_frames", "image_size", "num_classes", "embed_dim", "depth", "num_heads",
                    "backbone_width")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"STTConfig.{name} must be a positive int, got {value!r}")
        if self.attention not in ATTENTION_VARIANTS:
            raise ValueError(
                f"STTConfig.attention must be one of {ATTENTION_VARIANTS}, got {self.attention!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"STTConfig.embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if not self.mlp_ratio > 0:
            raise ValueError(f"STTConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        for name in ("drop_path_rate", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"STTConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")

    # Derived sizes -----------------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        """Side of the backbone's feature map: 7 for 112 x 112 frames."""
        side = self.image_size
        for _ in range(BACKBONE_DOWNSAMPLING_STAGES):
            side = math.ceil(side / 2)
        return side

    @property
    def num_patches(self) -> int:
        """N: tokens per frame."""
        return self.grid_size**2

    @property
    def num_tokens(self) -> int:
        """L = 1 + T * N: the cls token and every frame's patch tokens."""
        return 1 + self.num_frames * self.num_patches

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def backbone_channels(self) -> int:
        """Channels out of layer3 (256 for ResNet-18)."""
        return 4 * self.backbone_width

    # Serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> STTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown STTConfig fields: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> STTConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> STTConfig:
        return dataclasses.replace(self, **changes)


# The tiny presets keep every structural feature of the paper's model (several frames, a 4 x 4 grid,
# several heads, cls token, both attention variants) at a size that trains on the synthetic set and runs
# through the Triton interpreter in seconds on two CPU cores. Head dim 16 is the smallest the kernel
# supports; 64 x 64 frames (not 32) leave each token a face region small enough to learn from.
PRESETS: dict[str, STTConfig] = {
    "paper": STTConfig(),
    "paper-joint": STTConfig(attention="joint"),
    "tiny": STTConfig(num_frames=4, image_size=64, embed_dim=32, depth=2, num_heads=2,
                      backbone_width=8, drop_path_rate=0.0),
    "tiny-joint": STTConfig(num_frames=4, image_size=64, embed_dim=32, depth=2, num_heads=2,
                            backbone_width=8, drop_path_rate=0.0, attention="joint"),
}
DEFAULT_PRESET = "paper"


def get_config(name: str | STTConfig = DEFAULT_PRESET) -> STTConfig:
    """A preset by name (``paper``, ``paper-joint``, ``tiny``, ``tiny-joint``), or a config as is."""
    if isinstance(name, STTConfig):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown config {name!r}; choose one of {', '.join(PRESETS)}") from None
