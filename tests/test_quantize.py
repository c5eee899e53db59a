"""int8 (stt-fast quantize, stt_fast.export.quantize): a quantised graph that both CPU runtimes run, close to the
float32 program, labelled with its precision, and the command's report; the CPU's int8 units read from its
instruction sets."""

import json

import numpy as np
import onnx
import pytest
import torch
from stt_fast.export.onnx_export import read_metadata
from stt_fast.export.quantize import int8_units, openvino_session, quantize_program

from stt_fast import get_config, save_checkpoint
from stt_fast.accuracy import relative_error, tolerance
from stt_fast.cli import main
from stt_fast.compiler.validation import probe_clips, reference_logits
from stt_fast.predictors import load_predictor
from tests.helpers import trained_looking


def test_int8_units_from_the_instruction_sets():
    assert int8_units(["avx2", "avx512f", "avx512_vnni"]) == "avx512_vnni"
    assert int8_units(["avx2", "avx_vnni"]) == "avx_vnni"
    assert int8_units(["avx2", "amx_tile", "amx_int8"]) == "amx_int8"
    assert int8_units(["avx2", "avx512f", "avx512_bf16"]) is None


@pytest.fixture(scope="module")
def quantised(tmp_path_factory):
    model = trained_looking(get_config("tiny"))
    path = quantize_program(model, [probe_clips(model, batch=4, seed=s) for s in range(3)],
                            tmp_path_factory.mktemp("int8") / "model.int8.onnx")
    return model, path


def test_the_quantised_graph_is_int8_and_close_to_the_float32_program(quantised):
    model, path = quantised
    graph = onnx.load(str(path))
    ops = {node.op_type for node in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "MatMul"} <= ops
    weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(weights) >= 10, "the convolutions' and products' weights are stored as int8"
    meta = read_metadata(path)
    assert meta["stt_fast.precision"] == "int8" and json.loads(meta["stt_fast.config"])["embed_dim"] == 32
    clips = probe_clips(model, batch=6, seed=11)  # not the calibration clips
    expected = reference_logits(model, clips)
    ov_logits = torch.from_numpy(openvino_session(path)(clips.numpy()))
    predictor = load_predictor("onnx", onnx=path, device="cpu")
    assert predictor.name == "openvino (int8)"
    for got in (ov_logits, predictor(clips), predictor((clips * 255).round().to(torch.uint8))):
        assert 0 < relative_error(got, expected) < tolerance(torch.int8).model
    from stt_fast.export.parity import ort_session, run_session

    ort_logits = run_session(ort_session(path, ["CPUExecutionProvider"]), clips)
    assert relative_error(ort_logits, expected) < tolerance(torch.int8).model


def test_cli_quantize_writes_the_graph_and_its_report_and_never_replaces_them(tmp_path, capsys, monkeypatch):
    from stt_fast import environment
    from stt_fast.data.synthetic import SynthConfig, write_synthetic_dfew

    root = write_synthetic_dfew(tmp_path / "synth", SynthConfig(clips_per_class=2, seed=3), progress=False)
    checkpoint = save_checkpoint(trained_looking(get_config("tiny")), tmp_path / "m.safetensors")
    monkeypatch.setattr(environment, "cpu_isa", lambda flags=None: ["avx2"])  # a CPU without VNNI: warned
    out = tmp_path / "m.int8.onnx"
    args = ["quantize", str(checkpoint), "-o", str(out), "--calibration", str(root), "--clips", "6", "--eval",
            str(root), "--quiet"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "no int8 dot-product units" in captured.err and "label agreement" in captured.out
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["latency_ms"]) == {"fp32", "int8"} and report["labelled_clips"] > 0
    assert 0 <= report["labelled_label_agreement"] <= 1 and 0 <= report["int8_war"] <= 1
    assert report["relative_error"] < tolerance(torch.int8).model
    before = out.read_bytes()
    assert main(args) == 2 and "exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert np.isfinite(report["fp32_uar"])
