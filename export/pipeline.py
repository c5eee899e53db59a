"""The steps behind `stt-fast export`, `stt-fast build` and `stt-fast check`, each printing what it did."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from stt_fast.checkpoint import load_checkpoint
from stt_fast.files import refuse_to_replace, sha256_file, write_text_atomic
from stt_fast.progress import progress_bar

from .onnx_export import BatchRange, export_onnx
from .parity import ParityReport, onnx_vs_onnx, onnx_vs_reference
from .simplify import simplify_onnx


@dataclass(frozen=True)
class ExportedGraph:
    path: Path
    precision: str
    simplify: ParityReport | None
    reference: ParityReport

    @property
    def passed(self) -> bool:
        return self.reference.passed and (self.simplify is None or self.simplify.passed)


def fp16_path(path: Path) -> Path:
    """model.onnx -> model.fp16.onnx"""
    return path.with_name(f"{path.stem}.fp16{path.suffix}")


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, *, fp16: bool = False,
                      opset: int | None = None, batch: str = "1:8:64", input_dtype: str = "float32",
                      attention_op: bool = False, simplify: bool = True, overwrite: bool = False,
                      progress: bool = True, echo=print) -> list[ExportedGraph]:
    """Write output (the float32 graph) and, with fp16, its FP16 twin; each simplified and checked with
    ONNX Runtime against the unsimplified graph and against the reference model. Each graph's checks
    are kept beside it in GRAPH.parity.json. Existing files are refused unless overwrite."""
    output = Path(output)
    if output.suffix != ".onnx":
        raise ValueError(f"output must end in .onnx, got {output}")
    targets = [(output, "fp32")] + ([(fp16_path(output), "fp16")] if fp16 else [])
    refuse_to_replace([p for path, _ in targets for p in (path, Path(f"{path}.parity.json"))], overwrite)
    model = load_checkpoint(checkpoint)
    checkpoint_sha = sha256_file(checkpoint)
    batch_range = BatchRange.parse(batch)
    results = []
    stages = 3 if simplify else 2
    bar = progress_bar(desc="[export]", total=stages * len(targets), enabled=progress, unit="stage")
    for path, precision in targets:
        echo(f"[export] {precision} graph -> {path}")
        with tempfile.TemporaryDirectory(prefix="stt_fast-export-") as tmp:
            bar.set_description(f"[export] {precision}: exporting (the longest stage)")
            started = time.perf_counter()
            raw = export_onnx(model, Path(tmp) / "raw.onnx", precision=precision, input_dtype=input_dtype,
                              opset=opset, attention_op=attention_op, batch=batch_range,
                              checkpoint_sha256=checkpoint_sha)
            bar.update()
            echo(f"[export]   exported in {time.perf_counter() - started:.0f} s")
            simplify_report = None
            if simplify:
                bar.set_description(f"[export] {precision}: simplifying")
                result = simplify_onnx(raw, path)
                simplify_report = onnx_vs_onnx(path, raw, model)
                bar.update()
                echo(f"[export]   simplified with {result.tool}: {result.nodes_before} -> {result.nodes_after} "
                     f"nodes; parity with the unsimplified graph {simplify_report}")
            else:
                os.replace(raw, path)
        bar.set_description(f"[export] {precision}: checking against the reference")
        reference_report = onnx_vs_reference(path, model)
        bar.update()
        echo(f"[export]   parity with the reference: {reference_report}")
        graph = ExportedGraph(path, precision, simplify_report, reference_report)
        write_text_atomic(Path(f"{path}.parity.json"), json.dumps({
            "onnx": path.name, "onnx_sha256": sha256_file(path), "precision": precision,
            "checkpoint_sha256": checkpoint_sha, "checked_with": "onnxruntime CPUExecutionProvider",
            "simplify": simplify_report.to_dict() if simplify_report else None,
            "reference": reference_report.to_dict(), "passed": graph.passed}, indent=2))
        results.append(graph)
    bar.close()
    return results


def build_from_onnx(onnx_file: str | os.PathLike, engine: str | os.PathLike, *, checkpoint=None,
                    batch: str | None = None, overwrite: bool = False, echo=print, **options) -> dict:
    from .engine_runtime import sidecar_path
    from .tensorrt import build_engine

    refuse_to_replace([engine, sidecar_path(engine)], overwrite)
    reference = load_checkpoint(checkpoint) if checkpoint else None
    sidecar = build_engine(onnx_file, engine, batch=BatchRange.parse(batch) if batch else None,
                           reference_model=reference, **options)
    echo(f"[build] {engine}: TensorRT {sidecar['tensorrt_version']} on {sidecar['gpu']['name']} "
         f"(sm {sidecar['gpu']['compute_capability']}), {sidecar['precision']}, profile {sidecar['profile']}, "
         f"built in {sidecar['build_seconds']} s")
    if sidecar["accuracy"]:
        echo(f"[build] accuracy vs the reference: {sidecar['accuracy']}")
    return sidecar


def check_engine(engine: str | os.PathLike, checkpoint: str | os.PathLike, *, echo=print) -> ParityReport:
    from .engine_runtime import EngineRunner
    from .tensorrt import engine_vs_reference

    with EngineRunner(engine, buffers="torch") as runner:
        report = engine_vs_reference(runner, load_checkpoint(checkpoint))
    echo(f"[check] {engine}: {report}")
    return report
