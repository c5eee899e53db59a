"""Simplify an exported graph: onnxsim (constant folding, shape inference, dead-node removal), or
onnxslim where onnxsim is not installable (it has no wheels for the newest Pythons)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from stt_fast.files import atomic_output

from .onnx_export import load_onnx


@dataclass(frozen=True)
class SimplifyResult:
    path: Path
    tool: str
    nodes_before: int
    nodes_after: int


def simplify_onnx(src: str | os.PathLike, dst: str | os.PathLike,
                  io_names: tuple[str, str] | None = None) -> SimplifyResult:
    """Simplify the ONNX file src into dst (atomically); io_names as load_onnx checks them (default: the
    graph's own, from its metadata). The stt_fast metadata is kept."""
    import onnx

    model = load_onnx(src, io_names)
    before = len(model.graph.node)
    ours = [(p.key, p.value) for p in model.metadata_props if p.key.startswith("stt_fast.")]
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(model)
        if not ok:
            raise ValueError(f"onnxsim could not verify its simplification of {src}")
        tool = f"onnxsim {getattr(onnxsim, '__version__', '')}".strip()
    except ImportError:
        import onnxslim

        simplified = onnxslim.slim(model)
        tool = f"onnxslim {getattr(onnxslim, '__version__', '')}".strip()
    del simplified.metadata_props[:]  # onnxsim adds its own bookkeeping; keep only ours
    for key, value in ours:
        simplified.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    with atomic_output(dst) as tmp:
        onnx.save(simplified, str(tmp))
    return SimplifyResult(Path(dst), tool, before, len(simplified.graph.node))
