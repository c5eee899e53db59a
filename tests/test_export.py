"""Export pipeline on the CPU: ONNX export (dynamic batch), simplification, FP16 graph, parity through
ONNX Runtime, sidecar and compatibility logic, atomic writes, Triton repository. The TensorRT build and
run tests need TensorRT and a GPU and skip, saying so, where either is missing."""

import json

import numpy as np
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
from stt_fast.export.engine_runtime import (
    SIDECAR_FORMAT,
    check_engine_bytes,
    current_platform,
    sha256_bytes,
    sidecar_path,
)
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


# Nodes that move or retype values without computing on them, walked through when tracing the graph.
_PLUMBING = {"Cast", "Transpose", "Reshape", "Concat", "Split", "Slice", "Expand", "Unsqueeze", "Squeeze", "Gather",
             "Identity", "Flatten"}


def _producers(graph):
    return {out: node for node in graph.node for out in node.output}


def _reaches(name, producers, constants, wanted, seen=None):
    """The nodes of the op types in `wanted` reached from value `name`, walking back through plumbing."""
    seen = set() if seen is None else seen
    node = producers.get(name)
    if node is None or node.name in seen:
        return []
    seen.add(node.name)
    if node.op_type in wanted:
        return [node]
    if node.op_type not in _PLUMBING:
        return []
    return [n for i in node.input for n in _reaches(i, producers, constants, wanted, seen)]


@pytest.mark.parametrize("name", ["divided-fp32", "joint-fp32", "divided-fp16"])
def test_attention_scale_multiplies_q_before_the_first_product(exported, name):
    """TensorRT fuses MatMul-Softmax-MatMul attention only with the scale applied to Q (or K) before the
    first product (its developer guide, "Fused Attention"): every Softmax must be fed by a MatMul (no Mul
    or Div between them), one of whose operands comes from a Mul by a constant. (Mutation: scale the
    scores after the product, as the reference did, and the Softmax is fed by a Mul.)"""
    graph = load_onnx(exported[name][1]).graph
    producers = _producers(graph)
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                       for o in n.output}
    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    assert softmaxes
    for softmax in softmaxes:
        feeding = _reaches(softmax.input[0], producers, constants, {"MatMul", "Mul", "Div", "Add"})
        assert feeding and {n.op_type for n in feeding} == {"MatMul"}, \
            f"{softmax.name} is fed by {[n.op_type for n in feeding]}, not by the product alone"
        for matmul in feeding:
            scaled = [m for i in matmul.input for m in _reaches(i, producers, constants, {"Mul", "Div"})]
            assert any(set(m.input) & constants for m in scaled), f"{matmul.name}: no operand scaled by a constant"


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
    base = {"format": SIDECAR_FORMAT, "tensorrt_version": "10.3.0.30", "version_compatible": False,
            "hardware_compatibility": "none", "gpu": {"name": "Orin", "compute_capability": "8.7"}}
    base.update(over)
    return base


# The version, platform and hardware rules themselves: tests/test_engine_logic.py.


def test_same_compute_capability_other_gpu_name_is_a_warning():
    side = sidecar(gpu={"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"})
    warnings = check_compatible(side, tensorrt_version="10.3.0.30", gpu_name="NVIDIA H200", compute_capability="9.0")
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
                        onnx_sha256="0" * 64, tensorrt_version="10.3.0.30",
                        gpu={"name": "Orin", "compute_capability": "8.7"}, batch=(1, 4, 16))
    assert side["input"] == {"name": "clips", "dtype": "float32", "shape": [-1, 4, 3, 64, 64]}
    assert side["output"]["shape"] == [-1, 7] and side["labels"][0] == "Happy" and side["precision"] == "fp16"
    assert side["profile"] == {"min": 1, "opt": 4, "max": 16} and side["engine_sha256"] == sha256_bytes(payload)
    check_compatible(side, tensorrt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7")
    assert side["platform"] == current_platform(), "engines are tied to the platform that built them"
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

def _parsed_config(path):
    """config.pbtxt parsed by Triton's own ModelConfig protobuf (tritonclient): what the server reads."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_triton_repository_from_onnx(exported, tmp_path):
    from tritonclient.grpc import model_config_pb2 as pb

    _, path = exported["joint-uint8-attention-op"]
    version = write_triton_repository(path, tmp_path / "repo", name="stt", max_batch_size=32, instance_kind="cpu")
    repo = version.parent
    assert version.name == "1"
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == ["1", "1/model.onnx", "config.pbtxt",
                                                                         "labels.txt"]
    config = _parsed_config(repo / "config.pbtxt")
    assert config.name == "stt" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 32
    assert config.input[0].name == "clips" and config.input[0].data_type == pb.TYPE_UINT8
    assert list(config.input[0].dims) == [4, 3, 64, 64] and list(config.output[0].dims) == [7]
    assert config.output[0].label_filename == "labels.txt" and config.output[0].data_type == pb.TYPE_FP32
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16, 32]
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert (repo / "labels.txt").read_text().split() == ["Happy", "Sad", "Neutral", "Angry", "Surprise",
                                                         "Disgust", "Fear"]
    with pytest.raises(FileExistsError, match="version 2"):
        write_triton_repository(path, tmp_path / "repo", name="stt")
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["stt"], "no staging folder left behind"


def test_triton_repository_force_adds_a_version_and_keeps_the_first(exported, tmp_path):
    """(Mutation: --force used to delete version 1.)"""
    _, path = exported["joint-uint8-attention-op"]
    first = write_triton_repository(path, tmp_path / "repo", name="stt", max_batch_size=32)
    second = write_triton_repository(path, tmp_path / "repo", name="stt", max_batch_size=16, overwrite=True)
    assert (first.name, second.name) == ("1", "2")
    assert (first / "model.onnx").is_file() and (second / "model.onnx").is_file()
    assert _parsed_config(first.parent / "config.pbtxt").max_batch_size == 16, "the config follows the new version"
    assert sorted(p.name for p in first.parent.iterdir()) == ["1", "2", "config.pbtxt", "labels.txt"]
    _, other = exported["divided-fp32"]
    (first.parent / "config.pbtxt").write_text((first.parent / "config.pbtxt").read_text().replace(
        "onnxruntime_onnx", "tensorrt_plan"))
    with pytest.raises(ValueError, match="cannot be a new version"):
        write_triton_repository(other, tmp_path / "repo", name="stt", overwrite=True)


@pytest.mark.parametrize("kind,version_compatible", [("gpu", False), ("gpu", True)])
def test_triton_config_for_an_engine(kind, version_compatible, tmp_path):
    from tritonclient.grpc import model_config_pb2 as pb

    text = triton_config("stt", "tensorrt_plan", input_dtype="float32", frames=16, image_size=112, num_classes=7,
                         max_batch_size=64, preferred_batch_sizes=[8, 16, 128], max_queue_delay_us=500,
                         instances=2, has_labels=True, instance_kind=kind, version_compatible=version_compatible)
    (tmp_path / "config.pbtxt").write_text(text)
    config = _parsed_config(tmp_path / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.input[0].data_type == pb.TYPE_FP32
    assert list(config.input[0].dims) == [16, 3, 112, 112]
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert ("version-compatible=true" in text) == version_compatible


def test_a_tensorrt_plan_cannot_run_on_cpu_instances():
    with pytest.raises(ValueError, match="GPU only"):
        triton_config("stt", "tensorrt_plan", input_dtype="float32", frames=16, image_size=112, num_classes=7,
                      max_batch_size=64, preferred_batch_sizes=[8], max_queue_delay_us=500, instances=1,
                      has_labels=True, instance_kind="cpu")


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
    side = build_engine(path, engine, batch=BatchRange(2, 2, 4), reference_model=model, timing_cache=tmp_path)
    assert side["accuracy"]["passed"] and len(list(tmp_path.glob("timing-*.cache"))) == 1
    assert side["builder"]["profiling_verbosity"] == "DETAILED" and side["layers"]["layers"] > 0
    assert json.loads((tmp_path / "model.engine.layers.json").read_text())
    with EngineRunner(engine) as runner:
        assert runner.io.min_batch == 2 and runner.io.max_batch == 4 and runner.input_dtype == "float32"
        clips = torch.rand(7, 4, 3, 64, 64)  # above the profile maximum: chunks 4 + 3
        assert relative_error(runner(clips).cpu(), model(clips)) < tolerance(torch.float16).model
        one = clips[:1]  # below the profile minimum: padded to 2
        assert relative_error(runner(one).cpu(), model(one)) < tolerance(torch.float16).model
        as_bytes = (clips * 255).round().to(torch.uint8)  # uint8 clips to a float engine: rescaled
        assert relative_error(runner(as_bytes).cpu(), model(as_bytes)) < tolerance(torch.float16).model


@pytest.mark.tensorrt
def test_compile_with_tensorrt_backend(tmp_path):
    _tensorrt_or_skip()
    import stt_fast

    model = trained_looking(get_config("tiny")).cuda()
    compiled = stt_fast.compile(model, backend="tensorrt", cache_dir=tmp_path, batch="1:2:4")
    assert compiled.validation.passed
    again = stt_fast.compile(model, backend="tensorrt", cache_dir=tmp_path, batch="1:2:4")
    assert again.validation.passed and len(list(tmp_path.rglob("*.engine"))) == 1


@pytest.mark.tensorrt
def test_tensorrt_timeline_runs_two_engines_and_matches_windows_from_scratch(tmp_path):
    """The timeline on the tensorrt backend: frames and windows engines built on first use beside the whole
    engine, the cached windows equal to each window through the whole engine."""
    _tensorrt_or_skip()
    import stt_fast
    from stt_fast.timeline import Timeline

    model = trained_looking(get_config("tiny")).cuda()
    compiled = stt_fast.compile(model, backend="tensorrt", cache_dir=tmp_path, batch="1:2:4")
    frames = [np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8) for i in range(40)]
    results = {}
    for cache in (True, False):
        timeline = Timeline(compiled, window=1.0, stride=0.25, cache=cache)
        for i, frame in enumerate(frames):
            timeline.push(frame, i / 25)
        results[cache] = torch.tensor([r.logits for r in timeline.results])
    assert len(results[True]) == len(results[False]) > 0
    assert relative_error(results[True], results[False]) < tolerance(torch.float16).model
    assert sorted(p.name for p in tmp_path.rglob("*.engine")) == ["frames.engine", "model.engine", "windows.engine"]
