"""Export pipeline (import as stt_fast.export): ONNX, simplification, FP16 graph, TensorRT engines,
the engine runtime and sidecar, Triton Inference Server repositories.

    checkpoint -> export_onnx (fp32 / fp16 graph) -> simplify_onnx -> build_engine -> EngineRunner
"""

from stt_fast.accuracy import ParityReport

from .engine_runtime import EngineCompatibilityError, EngineRunner, check_compatible, read_sidecar
from .onnx_export import BatchRange, export_onnx, export_program, load_onnx, read_metadata
from .parity import onnx_vs_onnx, onnx_vs_reference
from .simplify import simplify_onnx
from .triton_server import write_triton_repository

__all__ = [
    "BatchRange",
    "EngineCompatibilityError",
    "EngineRunner",
    "ParityReport",
    "check_compatible",
    "export_onnx",
    "export_program",
    "load_onnx",
    "onnx_vs_onnx",
    "onnx_vs_reference",
    "read_metadata",
    "read_sidecar",
    "simplify_onnx",
    "write_triton_repository",
]
