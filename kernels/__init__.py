"""Triton kernels of the hot path, each beside its plain-PyTorch reference (import as stt_fast.kernels)."""

from .add_layer_norm import add_layer_norm
from .add_layer_norm_reference import add_layer_norm_reference
from .cls_attention import cls_attention
from .cls_attention_reference import cls_attention_reference
from .contract import MODES, check_attention_inputs
from .fused_linear import fused_linear
from .fused_linear_reference import fused_linear_reference
from .interpreter import round_bf16_to_nearest
from .max_pool import max_pool2d
from .st_attention import HAS_TRITON, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, interpreting, st_attention
from .st_attention_reference import st_attention_reference
from .st_attention_sdpa import st_attention_sdpa

if interpreting():  # the interpreter's float32 -> bfloat16 cast truncates; a GPU rounds (kernels/interpreter.py)
    round_bf16_to_nearest()

__all__ = [
    "HAS_TRITON",
    "MODES",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "add_layer_norm",
    "add_layer_norm_reference",
    "check_attention_inputs",
    "cls_attention",
    "cls_attention_reference",
    "fused_linear",
    "fused_linear_reference",
    "max_pool2d",
    "st_attention",
    "st_attention_reference",
    "st_attention_sdpa",
]
