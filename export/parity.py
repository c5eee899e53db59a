"""Numerical parity of exported graphs, run with ONNX Runtime: graph against graph (simplification)
and graph against the float32 reference model (every precision)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from stt_fast.accuracy import ParityReport, compare_logits, tolerance
from stt_fast.compiler.validation import probe_clips, reference_logits
from stt_fast.model import STT

from .onnx_export import INPUT_NAME, PRECISION_DTYPES, read_metadata


def ort_session(path: str | os.PathLike, providers: list[str] | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Idle worker threads sleep instead of spinning: spinning threads would steal the cores from
    # whatever runs next in this process (the benchmark's other backends, a training loop).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def run_session(session, clips: torch.Tensor) -> torch.Tensor:
    """Logits [B, K] (float32, CPU) of an ONNX Runtime session for clips [B, T, 3, H, W]."""
    out = session.run(None, {INPUT_NAME: np.ascontiguousarray(clips.cpu().numpy())})[0]
    return torch.from_numpy(np.asarray(out, dtype=np.float32))


def probe_inputs(model: STT, batch_sizes, input_dtype: str, seed: int = 0) -> list[torch.Tensor]:
    probes = [probe_clips(model, b, seed + i) for i, b in enumerate(batch_sizes)]
    if input_dtype == "uint8":
        probes = [(p * 255).round().to(torch.uint8) for p in probes]
    return probes


def onnx_vs_reference(path: str | os.PathLike, model: STT, batch_sizes=(1, 5), seed: int = 0) -> ParityReport:
    """The graph at path against the float32 reference, at the graph's precision's model tolerance."""
    meta = read_metadata(path)
    precision = meta.get("stt_fast.precision", "fp32")
    session = ort_session(path)
    probes = probe_inputs(model, batch_sizes, meta.get("stt_fast.input_dtype", "float32"), seed)
    outs = [run_session(session, p) for p in probes]
    refs = [reference_logits(model, p) for p in probes]
    return compare_logits("the float32 reference model", outs, refs, tolerance(PRECISION_DTYPES[precision]).model,
                   batch_sizes)


def onnx_vs_onnx(path: str | os.PathLike, baseline: str | os.PathLike, model: STT, batch_sizes=(1, 5),
                 seed: int = 0) -> ParityReport:
    """Two graphs of the same precision (e.g. simplified vs not): equal to a few roundings."""
    meta = read_metadata(baseline)
    precision = meta.get("stt_fast.precision", "fp32")
    probes = probe_inputs(model, batch_sizes, meta.get("stt_fast.input_dtype", "float32"), seed)
    a, b = ort_session(path), ort_session(baseline)
    return compare_logits(Path(baseline).name, [run_session(a, p) for p in probes], [run_session(b, p) for p in probes],
                   tolerance(PRECISION_DTYPES[precision]).kernel, batch_sizes)
