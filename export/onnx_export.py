"""STT to ONNX: the inference program (BatchNorm folded, last block pruned) through torch.onnx's dynamo
exporter, with a dynamic batch dimension, input "clips" and output "logits".

Two graph flavours, each at float32 or FP16:

- default (opset 18): MatMul-Softmax-MatMul attention and native LayerNormalization, the patterns
  TensorRT 10.x fuses (JetPack 6 ships TensorRT 10.3);
- attention_op (opset 23): the ONNX Attention op, which TensorRT 10.14 and later map to their fused
  attention directly.

The FP16 graph (precision="fp16") holds FP16 weights and activations for a strongly typed TensorRT
build (TensorRT 11 has no FP16 builder flag), with LayerNorm, softmax and the logits in float32:
FP16 LayerNorm and softmax overflow in transformers. The input stays float32 (or uint8): the graph
casts it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stt_fast.compiler.program import STTProgram
from stt_fast.files import atomic_output
from stt_fast.model import STT

from .engine_runtime import GRAPHS, INPUT_NAME, OUTPUT_NAME

DEFAULT_OPSET = 18
ATTENTION_OP_OPSET = 23
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
PRECISIONS = tuple(PRECISION_DTYPES)
INPUT_DTYPES = {"float32": torch.float32, "uint8": torch.uint8}
MAX_DYNAMIC_BATCH = 4096


@dataclass(frozen=True)
class BatchRange:
    """The batch sizes an engine is optimised for: min <= opt <= max."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch range must satisfy 1 <= min <= opt <= max, got {self}")

    @classmethod
    def parse(cls, text: str) -> BatchRange:
        """'MIN:OPT:MAX' (or a single 'N' for all three)."""
        parts = text.split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"batch range must be MIN:OPT:MAX integers, got {text!r}") from None
        if len(values) == 1:
            values *= 3
        if len(values) != 3:
            raise ValueError(f"batch range must be MIN:OPT:MAX, got {text!r}")
        return cls(*values)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


def graph_precision(dtype: torch.dtype, backend: str) -> str:
    """The graph precision ("fp32" or "fp16") for a compute dtype; ValueError naming the backend otherwise."""
    for name, value in PRECISION_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"backend {backend!r} runs float32 or float16 graphs, not {dtype}")


def export_program(model: STT, *, precision: str = "fp32", attention_op: bool = False) -> nn.Module:
    """The module that is exported: STTProgram with the export ops, in the graph's precision."""
    if not isinstance(model, STT):
        raise ValueError(f"export expects an stt_fast.STT, got {type(model).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    ops = "export-attention-op" if attention_op else "export"
    program = STTProgram(copy.deepcopy(model).cpu().float().eval(), ops=ops, channels_last=False).eval()
    if precision == "fp16":
        program = program.half()
        for module in program.modules():  # LayerNorm parameters stay float32 (the ops compute it in float32)
            if isinstance(module, nn.LayerNorm):
                module.float()
    return program


def onnx_metadata(model: STT, *, precision: str, input_dtype: str, opset: int, attention_op: bool,
                  batch: BatchRange, checkpoint_sha256: str | None) -> dict[str, str]:
    """Facts stored in the ONNX file's metadata_props, read back by the TensorRT build and the runner."""
    from stt_fast import __version__

    return {"stt_fast.version": __version__, "stt_fast.config": model.config.to_json(),
            "stt_fast.precision": precision, "stt_fast.input_dtype": input_dtype, "stt_fast.opset": str(opset),
            "stt_fast.attention_op": str(attention_op).lower(), "stt_fast.batch": str(batch),
            "stt_fast.checkpoint_sha256": checkpoint_sha256 or ""}


@contextlib.contextmanager
def quiet_exporter():
    """torch.onnx's own notices ("torchvision is not installed", deprecations) kept off the user's terminal."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exporter_log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            exporter_log.setLevel(level)


def export_onnx(model: STT, path: str | os.PathLike, *, precision: str = "fp32", input_dtype: str = "float32",
                opset: int | None = None, attention_op: bool = False, batch: BatchRange | None = None,
                checkpoint_sha256: str | None = None) -> Path:
    """Write model as an ONNX file at path (atomically) and return the path.

    precision "fp32" or "fp16"; input_dtype "float32" (clips in [0, 1]) or "uint8" (0-255, scaled in
    the graph); opset defaults to 18, or 23 with attention_op; batch: the intended engine profile,
    recorded in the metadata (the graph itself takes any batch size).
    """
    import onnx

    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input_dtype must be one of {sorted(INPUT_DTYPES)}, got {input_dtype!r}")
    opset = opset or (ATTENTION_OP_OPSET if attention_op else DEFAULT_OPSET)
    if attention_op and opset < ATTENTION_OP_OPSET:
        raise ValueError(f"the ONNX Attention op needs opset >= {ATTENTION_OP_OPSET}, got {opset}")
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (native LayerNormalization), got {opset}")
    batch = batch or BatchRange(1, 8, 64)
    program = export_program(model, precision=precision, attention_op=attention_op)
    c = model.config
    example = torch.randint(0, 256, (2, c.num_frames, 3, c.image_size, c.image_size), dtype=torch.uint8)
    example = example if input_dtype == "uint8" else example.float() / 255
    dynamic = {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)}}
    with atomic_output(path) as tmp, quiet_exporter():
        onnx_program = torch.onnx.export(program, (example,), dynamo=True, input_names=[INPUT_NAME],
                                         output_names=[OUTPUT_NAME], dynamic_shapes=dynamic,
                                         opset_version=opset, verbose=False)
        proto = onnx_program.model_proto
        meta = onnx_metadata(model, precision=precision, input_dtype=input_dtype, opset=opset,
                             attention_op=attention_op, batch=batch, checkpoint_sha256=checkpoint_sha256)
        for key, value in meta.items():
            proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
        onnx.save(proto, str(tmp))
    return Path(path)


def load_onnx(path: str | os.PathLike, io_names: tuple[str, str] | None = None):
    """The ONNX model at path, checked; ValueError naming the file when it is missing or invalid, or when
    its input and output are not io_names (default: those of the graph its metadata names, the whole
    model's when it names none; export/halves.py writes the others)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # protobuf DecodeError, onnx ValidationError, truncated files
        raise ValueError(f"{path} is not a valid ONNX model (corrupted or truncated?): {e}") from e
    if io_names is None:
        graph = read_metadata(model).get("stt_fast.graph", "whole")
        if graph not in GRAPHS:
            raise ValueError(f"{path} names an unknown stt_fast graph {graph!r}")
        io_names = GRAPHS[graph]
    if [i.name for i in model.graph.input] != [io_names[0]] or [o.name for o in model.graph.output] != [io_names[1]]:
        raise ValueError(f"{path} is not an stt_fast export: expected input '{io_names[0]}' and output "
                         f"'{io_names[1]}'")
    return model


def read_metadata(model_or_path) -> dict[str, str]:
    model = load_onnx(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("stt_fast.")}


def config_from_metadata(meta: dict[str, str]):
    from stt_fast.config import STTConfig

    if "stt_fast.config" not in meta:
        raise ValueError("the ONNX file carries no stt_fast config (not exported by stt_fast?)")
    return STTConfig.from_dict(json.loads(meta["stt_fast.config"]))
