"""Export pipeline on the CPU: ONNX export (dynamic batch), simplification, FP16 graph, parity through
ONNX Runtime, sidecar and compatibility logic, atomic writes, Triton repository. The TensorRT build and
run tests need TensorRT and a GPU and skip, saying so, where either is missing."""

import json

import onnx
import pytest
import torch
from stt_fast.export import (
    BatchRange,
    EngineCompatibilityError,
    EngineRunner,
    check_compatible,
    export_onnx,
    load_onnx,
    onnx_vs_onnx,
    onnx_vs_reference,
    read_metadata,
    read_sidecar,
    simplify_onnx,
    write_triton_repository,
)
from stt_fast.export.engine_runtime import SIDECAR_FORMAT, check_engine_bytes, sha256_bytes, sidecar_path
from stt_fast.export.parity import ort_session, run_session
from stt_fast.export.triton_server import triton_config

from stt_fast import STT, get_config, save_checkpoint
from stt_fast.accuracy import relative_error, tolerance
from stt_fast.cli import main
from tests.helpers import trained_looking

GRAPHS = {  # name: (preset, export options)
    "divided-fp32": ("tiny", dict()),
    "joint-fp32": ("tiny-joint", dict()),
    "divided-fp16": ("tiny", dict(precision="fp16")),
    "joint-uint8-attention-op": ("tiny-joint", dict(input_dtype="uint8", attention_op=True)),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, (preset, options) in GRAPHS.items():
        model = trained_looking(get_config(preset))
        out[name] = (model, export_onnx(model, folder / f"{name}.onnx", **options))
    return out


def _elem_types(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input,
                                                           *inferred.graph.output]}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    return inferred, types


@pytest.mark.parametrize("name", list(GRAPHS))
def test_dynamic_batch_runs_at_1_and_5(exported, name):
    model, path = exported[name]
    session = ort_session(path)
    precision = GRAPHS[name][1].get("precision", "fp32")
    for batch in (1, 5):
        clips = torch.rand(batch, model.config.num_frames, 3, model.config.image_size, model.config.image_size)
        if GRAPHS[name][1].get("input_dtype") == "uint8":
            clips = (clips * 255).to(torch.uint8)
        out = run_session(session, clips)
        with torch.no_grad():
            expected = model(clips)
        assert out.shape == (batch, 7)
        tol = tolerance(torch.float16 if precision == "fp16" else torch.float32).model
        assert relative_error(out, expected) < tol


def test_io_names_opset_and_dynamic_batch(exported):
    for name, (_, path) in exported.items():
        graph = load_onnx(path)
        assert [i.name for i in graph.graph.input] == ["clips"] and [o.name for o in graph.graph.output] == ["logits"]
        batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch_dim.dim_param and not batch_dim.dim_value, "batch must be dynamic"
        opset = {o.domain: o.version for o in graph.opset_import}[""]
        ops = {n.op_type for n in graph.graph.node}
        if "attention-op" in name:
            assert opset == 23 and "Attention" in ops
            assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
        else:
            assert opset == 18 and "Attention" not in ops
            assert {"LayerNormalization", "Softmax", "MatMul"} <= ops, "the patterns TensorRT 10 fuses"
        assert "BatchNormalization" not in ops, "BatchNorm must be folded"
        assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_fp16_graph_keeps_layernorm_softmax_and_logits_in_float32(exported):
    _, path = exported["divided-fp16"]
    inferred, types = _elem_types(load_onnx(path))
    float_, half = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    nodes = inferred.graph.node
    for node in nodes:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert types[node.input[0]] == float_, f"{node.op_type} {node.name} is not float32"
        if node.op_type in ("Conv", "MatMul", "Gemm"):
            assert types[node.input[1]] == half, f"{node.op_type} {node.name} weights are not FP16"
    assert types["clips"] == float_ and types["logits"] == float_
    assert read_metadata(path)["stt_fast.precision"] == "fp16"


def test_simplify_keeps_the_function_and_the_metadata(exported, tmp_path):
    model, path = exported["divided-fp32"]
    result = simplify_onnx(path, tmp_path / "simple.onnx")
    assert result.nodes_after <= result.nodes_before
    report = onnx_vs_onnx(result.path, path, model)
    assert report.passed, str(report)
    assert read_metadata(result.path) == read_metadata(path)
    fp16_model, fp16_path = exported["divided-fp16"]
    assert onnx_vs_onnx(simplify_onnx(fp16_path, tmp_path / "s16.onnx").path, fp16_path, fp16_model).passed


def test_parity_report_against_the_reference(exported):
    model, path = exported["divided-fp16"]
    report = onnx_vs_reference(path, model)
    assert report.passed and report.top1_agreement == 1.0
    assert report.tolerance == tolerance(torch.float16).model
    other = trained_looking(get_config("tiny"), seed=1)  # different weights: must fail
    assert not onnx_vs_reference(path, other).passed


def test_cli_export_writes_graphs_and_parity_reports(tmp_path, capsys):
    checkpoint = save_checkpoint(trained_looking(get_config("tiny")), tmp_path / "m.safetensors")
    assert main(["export", str(checkpoint), "-o", str(tmp_path / "model.onnx"), "--fp16", "--batch", "1:4:16"]) == 0
    out = capsys.readouterr().out
    assert "parity with the reference: ok" in out
    for name in ("model.onnx", "model.fp16.onnx"):
        report = json.loads((tmp_path / f"{name}.parity.json").read_text())
        assert report["passed"] and report["reference"]["passed"] and report["simplify"]["passed"]
        assert read_metadata(tmp_path / name)["stt_fast.batch"] == "1:4:16"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["m.safetensors", "model.onnx", "model.onnx.parity.json", "model.fp16.onnx", "model.fp16.onnx.parity.json"])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_damaged_onnx_file_gives_a_clear_error(exported, tmp_path, damage):
    _, path = exported["divided-fp32"]
    target = tmp_path / "bad.onnx"
    if damage == "truncated":
        target.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    elif damage == "garbage":
        target.write_bytes(b"\x00\x01not an onnx model" * 50)
    if damage == "missing":
        with pytest.raises(FileNotFoundError):
            load_onnx(target)
    else:
        with pytest.raises(ValueError, match="not a valid ONNX model"):
            load_onnx(target)


def test_interrupted_export_leaves_no_file(tmp_path, monkeypatch):
    def interrupted_save(proto, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(STT(get_config("tiny")).eval(), tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_batch_range_parsing():
    assert BatchRange.parse("1:8:64") == BatchRange(1, 8, 64)
    assert BatchRange.parse("4") == BatchRange(4, 4, 4)
    for bad in ("8:1:64", "0:1:2", "a:b:c", "1:2"):
        with pytest.raises(ValueError):
            BatchRange.parse(bad)


def test_bad_export_options():
    model = STT(get_config("tiny")).eval()
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, "/tmp/never.onnx", attention_op=True, opset=18)
    with pytest.raises(ValueError, match="precision"):
        export_onnx(model, "/tmp/never.onnx", precision="int8")
    with pytest.raises(ValueError, match="input_dtype"):
        export_onnx(model, "/tmp/never.onnx", input_dtype="float16")


# --- sidecar and compatibility (pure logic; no TensorRT needed) -------------------------------------

def sidecar(**over):
    base = {"format": SIDECAR_FORMAT, "tensorrt_version": "10.3.0", "version_compatible": False,
            "hardware_compatibility": "none", "gpu": {"name": "Orin", "compute_capability": "8.7"}}
    base.update(over)
    return base


@pytest.mark.parametrize("side,here,error", [
    (sidecar(), dict(tensorrt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7"), None),
    (sidecar(), dict(tensorrt_version="10.4.0", gpu_name="Orin", compute_capability="8.7"), "TensorRT 10.3.0"),
    (sidecar(), dict(tensorrt_version="10.3.0", gpu_name="NVIDIA H100", compute_capability="9.0"), "rebuild it"),
    (sidecar(version_compatible=True), dict(tensorrt_version="10.8.0", gpu_name="Orin", compute_capability="8.7"),
     None),
    (sidecar(version_compatible=True), dict(tensorrt_version="11.0.0", gpu_name="Orin", compute_capability="8.7"),
     "version-compatible"),
    (sidecar(version_compatible=True), dict(tensorrt_version="10.2.0", gpu_name="Orin", compute_capability="8.7"),
     "or newer"),
    (sidecar(hardware_compatibility="ampere_plus"),
     dict(tensorrt_version="10.3.0", gpu_name="NVIDIA H200", compute_capability="9.0"), None),
    (sidecar(hardware_compatibility="ampere_plus"),
     dict(tensorrt_version="10.3.0", gpu_name="Tesla T4", compute_capability="7.5"), "Ampere"),
], ids=["same", "other-trt", "other-gpu", "vc-newer", "vc-other-major", "vc-older", "hw-newer-gpu", "hw-old-gpu"])
def test_engine_compatibility(side, here, error):
    if error is None:
        check_compatible(side, **here)
    else:
        with pytest.raises(EngineCompatibilityError, match=error):
            check_compatible(side, **here)


def test_same_compute_capability_other_gpu_name_is_a_warning():
    side = sidecar(gpu={"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"})
    warnings = check_compatible(side, tensorrt_version="10.3.0", gpu_name="NVIDIA H200", compute_capability="9.0")
    assert warnings and "H100" in warnings[0]


def test_sidecar_missing_or_foreign_and_engine_hash(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"engine bytes")
    with pytest.raises(EngineCompatibilityError, match="no sidecar"):
        read_sidecar(engine)
    sidecar_path(engine).write_text(json.dumps({"format": "other"}))
    with pytest.raises(EngineCompatibilityError, match="format"):
        read_sidecar(engine)
    side = sidecar(engine_sha256=sha256_bytes(b"engine bytes"))
    check_engine_bytes(b"engine bytes", side, engine)
    with pytest.raises(EngineCompatibilityError, match="truncated"):
        check_engine_bytes(b"engine by", side, engine)


def test_sidecar_from_onnx_metadata_round_trips(exported, tmp_path):
    from stt_fast.export.engine_runtime import make_sidecar, write_sidecar

    _, path = exported["divided-fp16"]
    payload = b"placeholder bytes: only the sidecar logic is under test here, no engine is built"
    side = make_sidecar(engine_bytes=payload, onnx_meta=read_metadata(path), onnx_file=path.name,
                        onnx_sha256="0" * 64, tensorrt_version="10.3.0",
                        gpu={"name": "Orin", "compute_capability": "8.7"}, batch=(1, 4, 16))
    assert side["input"] == {"name": "clips", "dtype": "float32", "shape": [-1, 4, 3, 64, 64]}
    assert side["output"]["shape"] == [-1, 7] and side["labels"][0] == "Happy" and side["precision"] == "fp16"
    assert side["profile"] == {"min": 1, "opt": 4, "max": 16} and side["engine_sha256"] == sha256_bytes(payload)
    check_compatible(side, tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7")
    engine = tmp_path / "model.engine"
    write_sidecar(engine, side)
    assert read_sidecar(engine) == side and [p.name for p in tmp_path.iterdir()] == ["model.engine.json"]


def test_runner_refuses_a_truncated_engine_before_loading_it(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"12345678")
    sidecar_path(engine).write_text(json.dumps(sidecar(engine_sha256=sha256_bytes(b"123456789"))))
    with pytest.raises(EngineCompatibilityError, match="does not match the hash"):
        EngineRunner(engine)


# --- Triton Inference Server repository ------------------------------------------------------------

def test_triton_repository_from_onnx(exported, tmp_path):
    _, path = exported["joint-uint8-attention-op"]
    repo = write_triton_repository(path, tmp_path / "repo", name="stt", max_batch_size=32)
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == ["1", "1/model.onnx", "config.pbtxt",
                                                                         "labels.txt"]
    text = (repo / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in text and "max_batch_size: 32" in text
    assert "data_type: TYPE_UINT8" in text and "dims: [ 4, 3, 64, 64 ]" in text and "dims: [ 7 ]" in text
    assert "preferred_batch_size: [ 4, 8, 16, 32 ]" in text and "dynamic_batching" in text
    assert (repo / "labels.txt").read_text().split() == ["Happy", "Sad", "Neutral", "Angry", "Surprise",
                                                         "Disgust", "Fear"]
    with pytest.raises(FileExistsError):
        write_triton_repository(path, tmp_path / "repo", name="stt")
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["stt"], "no staging folder left behind"


def test_triton_config_for_an_engine():
    text = triton_config("stt", "tensorrt_plan", input_dtype="float32", frames=16, image_size=112, num_classes=7,
                         max_batch_size=64, preferred_batch_sizes=[8, 16, 128], max_queue_delay_us=500,
                         instances=2, has_labels=True)
    assert 'platform: "tensorrt_plan"' in text and "TYPE_FP32" in text and "dims: [ 16, 3, 112, 112 ]" in text
    assert "preferred_batch_size: [ 8, 16 ]" in text and "count: 2" in text and "KIND_GPU" in text


# --- TensorRT (needs TensorRT and a GPU) -------------------------------------------------------------

def _tensorrt_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("building and running a TensorRT engine needs a CUDA GPU and TensorRT's runtime library "
                    "(libnvinfer); this machine has neither. (TensorRT's Python bindings alone do install from "
                    "the registry: tests/test_api_conformance.py checks the code against them.)")
    pytest.importorskip("tensorrt", reason="TensorRT is not installed: pip install 'stt-fast[tensorrt]' (or JetPack's "
                                           "python3-libnvinfer on a Jetson)")


@pytest.mark.tensorrt
def test_tensorrt_build_run_and_check(exported, tmp_path):
    _tensorrt_or_skip()
    from stt_fast.export.tensorrt import build_engine

    model, path = exported["divided-fp16"]
    engine = tmp_path / "model.engine"
    side = build_engine(path, engine, batch=BatchRange(1, 2, 4), reference_model=model,
                        timing_cache=tmp_path / "timing.cache")
    assert side["accuracy"]["passed"] and (tmp_path / "timing.cache").is_file()
    runner = EngineRunner(engine)
    clips = torch.rand(6, 4, 3, 64, 64)  # above the profile maximum: runs in chunks
    assert relative_error(runner(clips).cpu(), model(clips)) < tolerance(torch.float16).model


@pytest.mark.tensorrt
def test_compile_with_tensorrt_backend(tmp_path):
    _tensorrt_or_skip()
    import stt_fast

    model = trained_looking(get_config("tiny")).cuda()
    compiled = stt_fast.compile(model, backend="tensorrt", cache_dir=tmp_path, batch="1:2:4")
    assert compiled.validation.passed
    again = stt_fast.compile(model, backend="tensorrt", cache_dir=tmp_path, batch="1:2:4")
    assert again.validation.passed and len(list(tmp_path.rglob("*.engine"))) == 1
