"""The logic of the TensorRT and edge-runner paths that needs neither TensorRT nor a GPU, run for real on
the CPU: input rescaling, profile chunking and padding, the engine's own I/O checked against its
sidecar, version and hardware rules, builder settings, cache staleness and keys, device memory growth,
layer information. (Each test names the defect it catches, as it would show on a GPU.)"""

import json

import numpy as np
import pytest
import torch
from stt_fast.export.engine_runtime import (
    SIDECAR_FORMAT,
    EngineCompatibilityError,
    EngineIO,
    GrowingAllocation,
    check_compatible,
    check_hardware_level,
    engine_input,
    engine_io,
    pad_rows,
    profile_chunks,
    run_in_chunks,
    sha256_bytes,
    sidecar_path,
)
from stt_fast.export.tensorrt import builder_settings, layer_summary, timing_cache_path
from stt_fast.export.tensorrt_backend import cached_engine_problem

from stt_fast.devices import cuda_device_index

# --- 1. clips rescaled to the engine's input dtype, for numpy and torch alike -------------------------

FLOATS = [0.0, 0.6 / 255, 0.502, 1.0, 127.4 / 255, 0.3 / 255]


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_float_clips_to_a_uint8_engine_are_scaled_by_255_and_rounded(lib):
    """(Mutation: a plain dtype conversion gives 0 or 1 for every value in [0, 1].)"""
    clips = np.array(FLOATS, dtype=np.float32) if lib == "numpy" else torch.tensor(FLOATS)
    out = engine_input(clips, "uint8")
    assert type(out) is type(clips)
    assert [int(v) for v in out] == [0, 1, 128, 255, 127, 0]
    assert str(out.dtype).endswith("uint8")


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_uint8_clips_to_a_float_engine_are_divided_by_255(lib):
    """(Mutation: a plain dtype conversion sends 0-255 to a model trained on [0, 1].)"""
    values = [0, 1, 128, 255]
    clips = np.array(values, dtype=np.uint8) if lib == "numpy" else torch.tensor(values, dtype=torch.uint8)
    out = engine_input(clips, "float32")
    assert [float(v) for v in out] == pytest.approx([v / 255 for v in values], abs=1e-7)
    assert str(out.dtype).endswith("float32")


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_matching_and_other_float_dtypes_pass_as_float32_or_uint8(lib):
    half = np.array([0.25, 0.75], dtype=np.float16) if lib == "numpy" else torch.tensor([0.25, 0.75]).half()
    assert [float(v) for v in engine_input(half, "float32")] == [0.25, 0.75]
    raw = np.array([3, 200], dtype=np.uint8) if lib == "numpy" else torch.tensor([3, 200], dtype=torch.uint8)
    assert engine_input(raw, "uint8") is raw


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("engine_dtype", ["float32", "uint8"])
def test_other_clip_dtypes_are_refused(lib, engine_dtype):
    clips = np.array([1, 2], dtype=np.int32) if lib == "numpy" else torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"uint8 .* or floating point"):
        engine_input(clips, engine_dtype)
    with pytest.raises(ValueError, match="engine input dtype"):
        engine_input(clips, "float16")


# --- 5. chunks within the profile, short ones padded up to its minimum ---------------------------------

@pytest.mark.parametrize("batch,profile,chunks", [
    (1, (1, 16), [(0, 1, 1)]),
    (1, (4, 16), [(0, 1, 4)]),                                  # below the minimum: padded
    (16, (4, 16), [(0, 16, 16)]),
    (35, (4, 16), [(0, 16, 16), (16, 32, 16), (32, 35, 4)]),    # a short last chunk padded
    (37, (4, 16), [(0, 16, 16), (16, 32, 16), (32, 37, 5)]),
    (8, (8, 8), [(0, 8, 8)]),
])
def test_profile_chunks(batch, profile, chunks):
    assert profile_chunks(batch, *profile) == chunks


def test_profile_chunks_refuse_bad_input():
    with pytest.raises(ValueError, match="batch"):
        profile_chunks(0, 1, 4)
    with pytest.raises(ValueError, match="profile"):
        profile_chunks(3, 5, 4)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_run_in_chunks_returns_each_clips_own_row(lib):
    """Every call the engine sees is inside its profile; padded rows never reach the caller."""
    io = EngineIO("clips", "float32", "logits", "float32", (7,), min_batch=4, opt_batch=8, max_batch=8)
    clips = np.arange(11 * 3, dtype=np.float32).reshape(11, 3)
    clips = clips if lib == "numpy" else torch.from_numpy(clips)
    seen = []

    def run_chunk(chunk):
        seen.append(chunk.shape[0])
        return chunk.sum(1, keepdims=True) if lib == "numpy" else chunk.sum(1, keepdim=True)

    concat = np.concatenate if lib == "numpy" else torch.cat
    out = run_in_chunks(clips, io, run_chunk, concat)
    assert seen == [8, 4] and all(io.min_batch <= s <= io.max_batch for s in seen)
    assert [float(v) for v in out[:, 0]] == [float(r.sum()) for r in clips]


def test_pad_rows_repeats_the_last_clip():
    chunk = np.array([[1, 2], [3, 4]])
    assert pad_rows(chunk, 4).tolist() == [[1, 2], [3, 4], [3, 4], [3, 4]]
    assert pad_rows(torch.tensor([[5]]), 3).tolist() == [[5], [5], [5]]
    assert pad_rows(chunk, 2) is chunk


# --- 6. the engine's own I/O, checked against the sidecar -----------------------------------------------

def _sidecar(**over):
    side = {"format": SIDECAR_FORMAT, "tensorrt_version": "10.3.0.30", "version_compatible": False,
            "hardware_compatibility": "none", "gpu": {"name": "Orin", "compute_capability": "8.7"},
            "platform": {"os": "Linux", "machine": "aarch64"},
            "input": {"name": "clips", "dtype": "float32"}, "profile": {"min": 1, "opt": 4, "max": 16},
            "config": {"num_frames": 16, "image_size": 112, "num_classes": 7}}
    side.update(over)
    return side


def _tensors(dtype="float32", profile=(1, 4, 16), frames=16, classes=7, out_dtype="float32", names=("clips", "logits")):
    shape = [-1, frames, 3, 112, 112]
    return [{"name": names[0], "mode": "INPUT", "dtype": dtype, "shape": shape,
             "profile": [[b, *shape[1:]] for b in profile]},
            {"name": names[1], "mode": "OUTPUT", "dtype": out_dtype, "shape": [-1, classes]}]


def test_engine_io_reads_dtype_classes_and_profile_from_the_engine():
    assert engine_io(_tensors(), _sidecar()) == EngineIO("clips", "float32", "logits", "float32", (7,), 1, 4, 16)
    uint8 = _sidecar(input={"name": "clips", "dtype": "uint8"}, profile={"min": 4, "opt": 8, "max": 32})
    assert engine_io(_tensors("uint8", (4, 8, 32)), uint8) == EngineIO("clips", "uint8", "logits", "float32", (7,),
                                                                       4, 8, 32)
    assert engine_io(_tensors(), _sidecar()).pixels


@pytest.mark.parametrize("tensors,message", [
    (_tensors(dtype="uint8"), "input dtype uint8 differs from the sidecar"),
    (_tensors(profile=(1, 8, 64)), "profile batch 1:8:64 differs"),
    (_tensors(frames=8), "input shape"),
    (_tensors(classes=6), "output shape"),
    (_tensors(out_dtype="float16"), "output dtype float16"),
    (_tensors(dtype="float16"), "input dtype float16 is not one of"),
    (_tensors(names=("input", "logits")), "exactly 'clips'"),
], ids=["input-dtype", "profile", "frames", "classes", "output-dtype", "fp16-input", "names"])
def test_engine_io_names_each_disagreement(tensors, message):
    """(Mutation: trusting the sidecar runs a uint8 engine on float buffers, or past its profile.)"""
    with pytest.raises(EngineCompatibilityError, match=message):
        engine_io(tensors, _sidecar())


# The timeline's two halves: frames [F, 3, S, S] -> features [F, N, C]; features [B, T*N, C] -> logits.
# Shapes of the paper model (N = 49 tokens of C = 256 channels, T = 16), the fp16 graphs.
HALF_IO = {"frames": ({"name": "frames", "dtype": "float32", "shape": [-1, 3, 112, 112]},
                      {"name": "features", "dtype": "float16", "shape": [-1, 49, 256]}),
           "windows": ({"name": "features", "dtype": "float16", "shape": [-1, 16 * 49, 256]},
                       {"name": "logits", "dtype": "float32", "shape": [-1, 7]})}


def _half(graph, *, in_dtype=None, out_shape=None, profile=(1, 16, 256), names=None):
    inputs, outputs = HALF_IO[graph]
    side = _sidecar(graph=graph, input=inputs, output=outputs,
                    profile=dict(zip(("min", "opt", "max"), (1, 16, 256))))
    shape = inputs["shape"]
    names = names or (inputs["name"], outputs["name"])
    tensors = [{"name": names[0], "mode": "INPUT", "dtype": in_dtype or inputs["dtype"], "shape": shape,
                "profile": [[b, *shape[1:]] for b in profile]},
               {"name": names[1], "mode": "OUTPUT", "dtype": outputs["dtype"], "shape": out_shape or outputs["shape"]}]
    return tensors, side


def test_engine_io_of_the_timeline_halves():
    """The frames engine's output and the windows engine's input are the features: their shape and dtype
    come from the sidecar (recorded from the ONNX files), and the windows input is not pixels."""
    frames = engine_io(*_half("frames"))
    assert frames == EngineIO("frames", "float32", "features", "float16", (49, 256), 1, 16, 256) and frames.pixels
    windows = engine_io(*_half("windows"))
    assert windows == EngineIO("features", "float16", "logits", "float32", (7,), 1, 16, 256) and not windows.pixels


@pytest.mark.parametrize("graph,over,message", [
    ("frames", {"out_shape": [-1, 50, 256]}, r"output shape \[-1, 50, 256\] is not \[-1, 49, 256\]"),
    ("windows", {"in_dtype": "float32"}, r"input dtype float32 is not one of \('float16',\)"),
    ("windows", {"names": ("clips", "logits")}, "exactly 'features' \\(input\\) and 'logits'"),
    ("frames", {"profile": (1, 8, 64)}, "profile batch 1:8:64 differs"),
], ids=["frames-tokens", "windows-dtype", "windows-names", "frames-profile"])
def test_engine_io_of_a_half_names_each_disagreement(graph, over, message):
    with pytest.raises(EngineCompatibilityError, match=message):
        engine_io(*_half(graph, **over))


def test_a_sidecar_naming_an_unknown_graph_is_refused():
    with pytest.raises(EngineCompatibilityError, match="graph 'decoder'"):
        engine_io(_tensors(), _sidecar(graph="decoder"))


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_features_are_cast_to_the_engine_dtype_never_rescaled(lib):
    """(Mutation: the pixel rule on features multiplies them by 255 or refuses float16.)"""
    values = [-3.5, 0.25, 7.0]
    features = np.array(values, dtype=np.float32) if lib == "numpy" else torch.tensor(values)
    half = engine_input(features, "float16", pixels=False)
    assert str(half.dtype).endswith("float16") and [float(v) for v in half] == values
    back = engine_input(half, "float32", pixels=False)
    assert str(back.dtype).endswith("float32") and [float(v) for v in back] == values
    raw = np.array([1, 2], dtype=np.uint8) if lib == "numpy" else torch.tensor([1, 2], dtype=torch.uint8)
    with pytest.raises(ValueError, match="features must be floating point"):
        engine_input(raw, "float16", pixels=False)
    with pytest.raises(ValueError, match="a features engine takes"):
        engine_input(features, "uint8", pixels=False)


# --- 7. and 11. version, platform and hardware rules ----------------------------------------------------

@pytest.mark.parametrize("over,here,error", [
    ({}, dict(tensorrt_version="10.3.0.30"), None),
    ({}, dict(tensorrt_version="10.3.0.26"), "cannot run on TensorRT 10.3.0.26"),  # all four fields
    ({}, dict(tensorrt_version="10.4.0.26"), "rebuild it here"),
    (dict(version_compatible=True, tensorrt_version="10.8.0.43"), dict(tensorrt_version="10.16.1.11"), None),
    (dict(version_compatible=True, tensorrt_version="10.8.0.43"), dict(tensorrt_version="11.4.0.106"), None),
    (dict(version_compatible=True, tensorrt_version="10.8.0.43"), dict(tensorrt_version="12.0.0.1"), "up to 11.x"),
    (dict(version_compatible=True, tensorrt_version="10.8.0.43"), dict(tensorrt_version="10.3.0.30"), "or newer"),
    ({}, dict(tensorrt_version="10.3.0.30", platform_here={"os": "Linux", "machine": "x86_64"}), "platforms"),
    (dict(hardware_compatibility="ampere_plus", gpu={"name": "NVIDIA A100", "compute_capability": "8.0"}),
     dict(tensorrt_version="10.3.0.30", gpu_name="NVIDIA H200", compute_capability="9.0"), None),
    (dict(hardware_compatibility="ampere_plus", gpu={"name": "NVIDIA A100", "compute_capability": "8.0"}),
     dict(tensorrt_version="10.3.0.30", compute_capability="8.7"), "not Jetson"),
    (dict(hardware_compatibility="ampere_plus", gpu={"name": "NVIDIA A100", "compute_capability": "8.0"}),
     dict(tensorrt_version="10.3.0.30", gpu_name="Tesla T4", compute_capability="7.5"), "Ampere"),
], ids=["same", "other-build", "other-minor", "vc-newer-minor", "vc-next-major", "vc-two-majors", "vc-older",
        "other-platform", "hw-newer-gpu", "hw-jetson", "hw-old-gpu"])
def test_compatibility_rules(over, here, error):
    args = dict(gpu_name="Orin", compute_capability="8.7", platform_here={"os": "Linux", "machine": "aarch64"})
    args.update(here)
    if error is None:
        check_compatible(_sidecar(**over), **args)
    else:
        with pytest.raises(EngineCompatibilityError, match=error):
            check_compatible(_sidecar(**over), **args)


@pytest.mark.parametrize("level,capability,error", [
    ("none", "8.7", None), ("ampere_plus", "9.0", None), ("same_compute_capability", "8.9", None),
    ("ampere_plus", "8.7", "Jetson"), ("same_compute_capability", "8.7", "Jetson"),
    ("ampere_plus", "7.5", "Ampere"), ("ampere", "9.0", "must be one of"),
])
def test_hardware_levels_that_can_be_built(level, capability, error):
    if error is None:
        check_hardware_level(level, capability)
    else:
        with pytest.raises(ValueError, match=error):
            check_hardware_level(level, capability)


# --- 8., 12., 14. what the builder is asked --------------------------------------------------------------

def _settings(**over):
    args = dict(precision="fp16", attention_op=False, version_compatible=False, hardware_compatibility="none",
                tensorrt_version="10.3.0.30", compute_capability="9.0")
    args.update(over)
    return builder_settings(**args)


def test_float32_engines_clear_tf32_and_fp16_engines_keep_the_defaults():
    """(Mutation: without clearing TF32, an fp32 engine on Ampere+ misses the 1e-4 float32 tolerance.)"""
    assert _settings(precision="fp32")["clear_flags"] == ["TF32"]
    assert _settings(precision="fp16")["clear_flags"] == []


def test_builder_settings_flags_levels_and_verbosity():
    assert _settings() == {"clear_flags": [], "set_flags": [], "hardware_level": None,
                           "profiling_verbosity": "DETAILED"}
    assert _settings(version_compatible=True)["set_flags"] == ["VERSION_COMPATIBLE"]
    assert _settings(hardware_compatibility="same_compute_capability")["hardware_level"] == "SAME_COMPUTE_CAPABILITY"
    assert _settings(hardware_compatibility="ampere_plus")["hardware_level"] == "AMPERE_PLUS"
    with pytest.raises(ValueError, match="Jetson"):
        _settings(hardware_compatibility="ampere_plus", compute_capability="8.7")


@pytest.mark.parametrize("version,ok", [("10.3.0.30", False), ("10.13.3.9", False), ("10.14.1.48", True),
                                        ("11.4.0.106", True)])
def test_the_attention_op_graph_needs_tensorrt_10_14(version, ok):
    if ok:
        _settings(attention_op=True, tensorrt_version=version)
    else:
        with pytest.raises(ValueError, match=r"10\.14"):
            _settings(attention_op=True, tensorrt_version=version)


def test_layer_summary_counts_layers_and_finds_fused_attention():
    detailed = json.dumps({"Layers": [{"Name": "conv1 + relu"}, {"Name": "_gemm_mha_v2_myl0_3"},
                                      {"Name": "Softmax"}], "Bindings": ["clips", "logits"]})
    assert layer_summary(detailed) == {"layers": 3, "attention_layers": ["_gemm_mha_v2_myl0_3"]}
    assert layer_summary(json.dumps({"Layers": ["a", "fmha_1"]})) == {"layers": 2, "attention_layers": ["fmha_1"]}


# --- 9. the compile cache: stale engines rebuilt, timing caches kept apart -----------------------------

def test_cached_engine_problems(tmp_path):
    """Bytes on disk and a sidecar: only the cache's reuse rule is under test (no engine is loaded)."""
    engine = tmp_path / "model.engine"
    here = dict(tensorrt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7")
    assert "no engine" in cached_engine_problem(engine, **here)
    engine.write_bytes(b"serialized plan")
    assert "no sidecar" in cached_engine_problem(engine, **here)
    side = _sidecar(engine_sha256=sha256_bytes(b"serialized plan"), platform=None)
    sidecar_path(engine).write_text(json.dumps(side))
    assert cached_engine_problem(engine, **here) is None
    assert "cannot run on TensorRT" in cached_engine_problem(engine, **{**here, "tensorrt_version": "10.4.0.1"})
    engine.write_bytes(b"another plan")
    assert "does not match the hash" in cached_engine_problem(engine, **here)
    sidecar_path(engine).write_text("{truncated")
    assert "unreadable" in cached_engine_problem(engine, **here)


def test_timing_caches_are_keyed_by_tensorrt_gpu_and_flags(tmp_path):
    gpu = {"name": "NVIDIA H100", "compute_capability": "9.0"}
    base = timing_cache_path(tmp_path, tensorrt_version="10.3.0.30", gpu=gpu, settings=_settings())
    assert base == timing_cache_path(tmp_path, tensorrt_version="10.3.0.30", gpu=dict(gpu), settings=_settings())
    others = {timing_cache_path(tmp_path, tensorrt_version="10.16.1.11", gpu=gpu, settings=_settings()),
              timing_cache_path(tmp_path, tensorrt_version="10.3.0.30", gpu={**gpu, "name": "NVIDIA A100",
                                                                             "compute_capability": "8.0"},
                                settings=_settings()),
              timing_cache_path(tmp_path, tensorrt_version="10.3.0.30", gpu=gpu, settings=_settings(precision="fp32"))}
    assert base not in others and len(others) == 3 and base.parent == tmp_path


# --- 10. device memory: grown, reused, never a freed pointer left behind -------------------------------

class _Allocator:
    def __init__(self, fail_at=None):
        self.live, self.calls, self.fail_at = set(), 0, fail_at

    def alloc(self, nbytes):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("cudaMalloc failed: cudaErrorMemoryAllocation")
        handle = (self.calls, nbytes)
        self.live.add(handle)
        return handle

    def free(self, handle):
        self.live.remove(handle)  # a double free raises KeyError


def test_growing_allocation_grows_reuses_and_releases():
    allocator = _Allocator()
    buffer = GrowingAllocation(allocator.alloc, allocator.free)
    first = buffer.ensure(100)
    assert buffer.ensure(60) is first and allocator.calls == 1
    second = buffer.ensure(200)
    assert second != first and allocator.live == {second} and buffer.nbytes == 200
    buffer.release()
    buffer.release()
    assert allocator.live == set() and buffer.handle is None


def test_a_failed_allocation_leaves_the_buffer_empty_not_dangling():
    """(Mutation: the old _ensure kept freed pointers with the old capacity after a failed cudaMalloc.)"""
    allocator = _Allocator(fail_at=2)
    buffer = GrowingAllocation(allocator.alloc, allocator.free)
    buffer.ensure(100)
    with pytest.raises(RuntimeError, match="cudaMalloc"):
        buffer.ensure(1000)
    assert buffer.handle is None and buffer.nbytes == 0 and allocator.live == set()
    assert buffer.ensure(50) is not None and len(allocator.live) == 1


# --- 3. the CUDA device a torch.device names ------------------------------------------------------------

def test_cuda_device_index(monkeypatch):
    """A bare "cuda" is the current device (PyTorch's meaning), not 0. (Mutation: `dev.index or 0`.)"""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert cuda_device_index("cuda") == 1
    assert cuda_device_index(torch.device("cuda", 2)) == 2
    assert cuda_device_index("cuda:0") == 0
    with pytest.raises(ValueError, match="CUDA device"):
        cuda_device_index("cpu")
