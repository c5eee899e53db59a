"""Parameter and FLOP counts of the model, measured with torch.utils.flop_counter on the meta device.

FLOPs count matrix products and convolutions (2 per multiply-add), the attention products included;
normalisations, softmax and element-wise work are not counted (the usual convention).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import STTConfig
from .model import STT


@dataclass(frozen=True)
class ModelCost:
    parameters: int
    flops_per_clip: int
    backbone_flops_per_clip: int
    transformer_flops_per_clip: int  # token projection, blocks, head

    @property
    def gflops_per_clip(self) -> float:
        return self.flops_per_clip / 1e9


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=16)
def model_cost(config: STTConfig) -> ModelCost:
    """Parameters and FLOPs per clip of STT(config), without allocating any weights."""
    with torch.device("meta"):
        model = STT(config).eval()
        clips = torch.empty(1, config.num_frames, 3, config.image_size, config.image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(clips)
    total = counter.get_total_flops()
    by_module = counter.get_flop_counts()
    backbone = sum(next((counts for name, counts in by_module.items() if name.endswith(".backbone")),
                        {}).values())
    return ModelCost(count_parameters(model), int(total), int(backbone), int(total - backbone))


@functools.lru_cache(maxsize=16)
def program_flops(config: STTConfig) -> int:
    """FLOPs per clip of the compiled inference program (stt_fast.compiler.program), which prunes the
    last block to the cls token and folds layers: what stt_fast.compile actually executes. Counted
    with the export ops (explicit attention products) on one random clip."""
    from .compiler.program import STTProgram

    program = STTProgram(STT(config).eval(), ops="export", channels_last=False).eval()
    clips = torch.rand(1, config.num_frames, 3, config.image_size, config.image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        program(clips)
    return int(counter.get_total_flops())
