"""int8: post-training static quantisation of stt_fast's program, for CPUs with int8 dot-product units.

    quantize_program(model, calibration_clips, "model.int8.onnx")

The program's float32 graph (the one the CPU backends run) is quantised by ONNX Runtime's quantiser
(quantize_static): the convolutions and matrix products get int8 weights (per output channel) and uint8
activations whose ranges come from the calibration clips (MinMax), as QuantizeLinear/DequantizeLinear pairs
(QDQ) around float operations; LayerNorm, softmax, GELU and the head stay in float32. Both CPU runtimes run
the result: OpenVINO (faster here) and ONNX Runtime, which turn the QDQ pairs into int8 kernels (VNNI or
AMX-INT8 where the CPU has them). The graph keeps stt_fast's metadata, with stt_fast.precision "int8", so
that `stt-fast predict --backend onnx --onnx model.int8.onnx` runs it.

Measured on this project's CPU machines: on the AVX2-only EPYC (no VNNI) int8 was slower than float32;
on the AVX-512 EPYC with VNNI (2026-12-04) the paper model took 62 ms a clip in OpenVINO against 172 ms
in float32 and 98 ms in bfloat16 (README, "int8"). int8_units() says whether this CPU has the units.
Quantisation changes the numbers far more than bf16 does: `stt-fast quantize` measures what it costs
(label agreement with float32, and WAR/UAR on a labelled set) and reports it beside the speed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from stt_fast.inputs import clips_to_float
from stt_fast.model import STT

INT8_UNITS = ("avx512_vnni", "avx_vnni", "amx_int8")
QUANTISED_OPS = ("Conv", "MatMul", "Gemm")


def int8_units(isa: Iterable[str]) -> str | None:
    """The instruction set giving this CPU int8 dot products (VNNI, AMX-INT8), or None."""
    isa = set(isa)
    return next((name for name in INT8_UNITS if name in isa), None)


def quantize_program(model: STT, calibration: Iterable[torch.Tensor], output: str | os.PathLike, *,
                     cache_dir: str | os.PathLike | None = None) -> Path:
    """Write model's program quantised to int8 (module docstring) to output, atomically. calibration: clip
    batches [B, T, 3, H, W] (uint8, or float in [0, 1]) of the data the model will see; a few dozen clips."""
    try:
        import onnx
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    except ImportError:
        raise ImportError("int8 quantisation needs onnxruntime and onnx: pip install 'stt-fast[export]'") from None
    from stt_fast.files import atomic_output

    from .onnx_cache import program_graph
    from .onnx_export import read_metadata

    graph = program_graph(model, "fp32", cache_dir)
    name = onnx.load(str(graph), load_external_data=False).graph.input[0].name
    batches = [clips_to_float(c.cpu(), torch.float32).numpy() for c in calibration]
    if not batches:
        raise ValueError("calibration needs at least one clip")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = iter(batches)

        def get_next(self):
            batch = next(self.left, None)
            return None if batch is None else {name: np.ascontiguousarray(batch)}

    output = Path(output)
    root = logging.getLogger()
    level = root.level
    with atomic_output(output) as tmp:
        # Without ONNX Runtime's pre-processing (quant_pre_process), which it recommends on the root logger: its
        # shape annotations made OpenVINO refuse the quantised program (a Concat's shapes inconsistent)
        root.setLevel(logging.ERROR)
        try:
            quantize_static(str(graph), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            op_types_to_quantize=list(QUANTISED_OPS))
        finally:
            root.setLevel(level)
        quantised = onnx.load(str(tmp))
        meta = read_metadata(graph) | {"stt_fast.precision": "int8", "stt_fast.calibration_clips":
                                       str(sum(len(b) for b in batches))}
        del quantised.metadata_props[:]
        for key, value in meta.items():
            quantised.metadata_props.add(key=key, value=value)
        onnx.save(quantised, str(tmp))
    return output


def openvino_session(path: str | os.PathLike):
    """clips (float32 numpy [B, T, 3, H, W]) -> logits, through OpenVINO's CPU plugin on an ONNX graph (the
    int8 graph's non-quantised operations in float32)."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                          "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(clips: np.ndarray) -> np.ndarray:
        request.infer({0: np.ascontiguousarray(clips)})
        return request.get_output_tensor(0).data.copy()

    return run


def calibration_clips(source: str | os.PathLike, config, count: int = 32, batch: int = 8) -> list[torch.Tensor]:
    """Up to `count` clips of SOURCE (a folder searched recursively, a DFEW-layout set or a list file, as
    `stt-fast annotate` takes it), evenly spread over it, read as `predict` reads them: float32 batches."""
    from stt_fast.annotate import list_sources
    from stt_fast.data.pipeline import ClipPipeline

    paths = list_sources(source)
    step = max(1, len(paths) // count)
    pipeline = ClipPipeline(config.num_frames, config.image_size)
    clips = [item.clip for item in pipeline.read_ahead(paths[::step][:count]) if item.clip is not None]
    if not clips:
        raise ValueError(f"{source}: no readable clip to calibrate on")
    return [torch.stack(clips[i:i + batch]) for i in range(0, len(clips), batch)]


def quantization_report(model: STT, int8_path: str | os.PathLike, *, probe: list[torch.Tensor],
                        labelled=None, isa: Iterable[str] = ()) -> dict:
    """What int8 costs and gives, against the float32 program (stt_fast.compile, OpenVINO or the CPU default):
    relative error of the logits and label agreement on the probe batches; with a labelled ClipDataset, WAR and
    UAR of both and their label agreement there; median latency of one clip in float32, bfloat16 (where this
    CPU has native bf16) and int8."""
    from stt_fast.benchmarks.timing import measure

    import stt_fast
    from stt_fast.accuracy import relative_error
    from stt_fast.compiler.precision import native_bf16
    from stt_fast.metrics import summarize

    runner = openvino_session(int8_path)

    def int8(clips: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(runner(clips_to_float(clips.cpu(), torch.float32).numpy()))

    fp32 = stt_fast.compile(model, dtype="fp32")
    with torch.no_grad():
        ref = torch.cat([fp32(c) for c in probe])
        got = torch.cat([int8(c) for c in probe])
    report = {"probe_clips": len(ref), "relative_error": relative_error(got, ref),
              "probe_label_agreement": (got.argmax(-1) == ref.argmax(-1)).double().mean().item(),
              "int8_units": int8_units(isa)}
    if labelled is not None:
        from stt_fast.data.datasets import make_loader

        predicted = {"fp32": [], "int8": []}
        targets = []
        for batch in make_loader(labelled, batch_size=16, workers=0):
            if batch["clips"] is None:
                continue
            with torch.no_grad():
                predicted["fp32"].append(fp32(batch["clips"]).argmax(-1))
                predicted["int8"].append(int8(batch["clips"]).argmax(-1))
            targets.append(batch["labels"])
        labels = torch.cat(targets)
        for name, preds in predicted.items():
            summary = summarize(torch.cat(preds), labels, model.config.num_classes)
            report[f"{name}_war"], report[f"{name}_uar"] = summary["war"], summary["uar"]
        report["labelled_clips"] = len(labels)
        report["labelled_label_agreement"] = (torch.cat(predicted["fp32"]) == torch.cat(predicted["int8"])) \
            .double().mean().item()
    one = probe[0][:1]
    timings = {"fp32": fp32}
    if native_bf16(isa):
        timings["bf16"] = stt_fast.compile(model, dtype="bf16", backend="openvino" if fp32.backend == "openvino"
                                           else "torch")
    timings["int8"] = int8
    with torch.no_grad():
        report["latency_ms"] = {name: round(measure(lambda f=f: f(one), min_runs=5, min_seconds=1.0).median_ms, 2)
                                for name, f in timings.items()}
    report["fp32_backend"] = fp32.backend
    return report
