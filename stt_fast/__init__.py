"""stt_fast: an optimized inference engine for STT, the Spatio-Temporal Transformer for dynamic
facial expression recognition (a face video clip in, one of seven emotions out).

    import stt_fast
    model = stt_fast.STT(stt_fast.STTConfig())           # the reference model
    fast = stt_fast.compile(model)                       # same logits, much faster
"""

from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_torchvision_resnet18,
    save_checkpoint,
)
from .compiler import CompiledSTT, ValidationError, compile
from .config import EMOTIONS, PRESETS, STTConfig, get_config
from .loss import CompactSoftmaxCrossEntropy
from .model import STT

__version__ = "0.1.0"

__all__ = [
    "EMOTIONS",
    "PRESETS",
    "STT",
    "CheckpointError",
    "CompactSoftmaxCrossEntropy",
    "CompiledSTT",
    "STTConfig",
    "ValidationError",
    "compile",
    "get_config",
    "load_checkpoint",
    "load_torchvision_resnet18",
    "save_checkpoint",
]
