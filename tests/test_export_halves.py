"""The timeline's two exported graphs (export/halves.py): their I/O is what their metadata declares and
what a TensorRT engine of each must have (the sidecar, the profile), and the two composed give the
reference's logits (ONNX Runtime). The TensorRT engines themselves need TensorRT and a GPU."""

import json

import numpy as np
import onnx
import pytest
import torch
from stt_fast.export.engine_runtime import declared_io, make_sidecar
from stt_fast.export.halves import export_halves, halves_io, halves_logits, halves_profiles
from stt_fast.export.onnx_export import BatchRange, load_onnx, read_metadata
from stt_fast.export.parity import ort_session
from stt_fast.export.tensorrt import profile_shapes

from stt_fast import get_config
from stt_fast.accuracy import relative_error, tolerance
from tests.helpers import trained_looking

TINY = get_config("tiny")  # T = 4 frames of 64 x 64: N = 16 tokens of C = 32 channels
ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    model = trained_looking(TINY)
    # fp16 only: its features change dtype between the halves; the fp32 pair runs in tests/test_timeline.py
    return model, {"fp16": export_halves(model, tmp_path_factory.mktemp("fp16"), precision="fp16")}


def _graph_io(path):
    graph = onnx.load(str(path)).graph
    return [{"name": t.name, "dtype": ONNX_DTYPES[t.type.tensor_type.elem_type],
             "shape": [d.dim_value or -1 for d in t.type.tensor_type.shape.dim]} for t in (*graph.input, *graph.output)]


def test_each_half_is_what_its_metadata_declares(halves, precision="fp16"):
    """(Mutation: a feature shape or dtype in the metadata that the graph does not have builds a TensorRT
    profile the parser refuses, or binds fp32 buffers to fp16 features.)"""
    _, paths = halves
    features = "float16"
    want = {"frames": [{"name": "frames", "dtype": "float32", "shape": [-1, 3, 64, 64]},
                       {"name": "features", "dtype": features, "shape": [-1, 16, 32]}],
            "windows": [{"name": "features", "dtype": features, "shape": [-1, 4 * 16, 32]},
                        {"name": "logits", "dtype": "float32", "shape": [-1, 7]}]}
    for name, path in paths[precision].items():
        assert _graph_io(path) == want[name], name
        meta = read_metadata(load_onnx(path))  # load_onnx checks the names the metadata's graph has
        graph, inputs, outputs = declared_io(meta)
        assert graph == name and [inputs, outputs] == want[name]
        assert halves_io(TINY, precision)[name] == {"input": want[name][0], "output": want[name][1]}
        assert meta["stt_fast.precision"] == precision and json.loads(meta["stt_fast.config"]) == TINY.to_dict()


def test_the_profile_and_sidecar_of_each_half(halves):
    _, paths = halves
    frames, windows = (read_metadata(paths["fp16"][n]) for n in ("frames", "windows"))
    assert profile_shapes(frames, BatchRange(1, 4, 32)) == ("frames", (1, 3, 64, 64), (4, 3, 64, 64), (32, 3, 64, 64))
    assert profile_shapes(windows, BatchRange(2, 2, 8)) == ("features", (2, 64, 32), (2, 64, 32), (8, 64, 32))
    side = make_sidecar(engine_bytes=b"not an engine: the sidecar logic only", onnx_meta=windows,
                        onnx_file="windows.onnx", onnx_sha256="0" * 64, tensorrt_version="10.3.0.30",
                        gpu={"name": "Orin", "compute_capability": "8.7"}, batch=(1, 1, 64))
    assert side["graph"] == "windows" and side["input"]["dtype"] == "float16" and side["labels"][0] == "Happy"
    side = make_sidecar(engine_bytes=b"", onnx_meta=frames, onnx_file="frames.onnx", onnx_sha256="0" * 64,
                        tensorrt_version="10.3.0.30", gpu={"name": "Orin", "compute_capability": "8.7"},
                        batch=(1, 4, 256))
    assert side["output"] == {"name": "features", "dtype": "float16", "shape": [-1, 16, 32]} and side["labels"] is None


@pytest.mark.parametrize("batch,frames,windows", [
    ("1:8:64", (1, 16, 1024), (1, 1, 64)),
    ("4:8:16", (4, 16, 256), (4, 4, 16)),   # a minimum above one window: the windows half tuned for it
    ("1:1:1", (1, 16, 16), (1, 1, 1)),
])
def test_halves_profiles(batch, frames, windows):
    """The frames engine takes up to the frames of the whole profile's largest batch, tuned for one window."""
    profiles = halves_profiles(BatchRange.parse(batch), num_frames=16)
    assert (profiles["frames"].min, profiles["frames"].opt, profiles["frames"].max) == frames
    assert (profiles["windows"].min, profiles["windows"].opt, profiles["windows"].max) == windows


def test_the_two_halves_composed_give_the_reference_logits(halves, precision="fp16"):
    """frames through one graph, every clip's T frames' features through the other: the model's logits
    (uint8 clips, as the timeline gives them; 3 clips, so that frames of different clips are not mixed)."""
    model, paths = halves
    sessions = {n: ort_session(p) for n, p in paths[precision].items()}

    def run(name, dtype):
        session = sessions[name]
        return lambda x: session.run(None, {session.get_inputs()[0].name: np.asarray(x, dtype=dtype)})[0]

    clips = torch.randint(0, 256, (3, TINY.num_frames, 3, 64, 64), dtype=torch.uint8)
    got = halves_logits(lambda f: run("frames", np.float32)(f.float() / 255), run("windows", np.float16), clips)
    for i in range(len(clips)):  # each clip's own row (frames of two clips mixed would fail here)
        with torch.no_grad():
            want = model(clips[i:i + 1])
        assert relative_error(got[i:i + 1].float(), want) < tolerance(torch.float16).model, i
