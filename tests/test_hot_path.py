"""The GPU hot path without a GPU, and the reference model under the tools users trace it with.

- The compiled module's CUDA path (program, both op sets, non-finite handling) runs on fake CUDA
  tensors: FakeTensorMode gives device="cuda" tensors without a GPU and raises on any Python branch
  that reads a value, which on a real GPU would be a blocking device-to-host sync per call.
- The reference model exports and compiles as users do it: torch.export with a dynamic batch,
  torch.onnx.export (dynamo and the legacy TorchScript exporter) run in ONNX Runtime at batch sizes
  other than the traced one, and torch.compile(fullgraph=True).
"""

import math
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

import stt_fast
from stt_fast import STT, get_config
from stt_fast.inputs import check_clips
from stt_fast.launch_plan import fake_cuda_module
from tests.helpers import clips, trained_looking

PRESETS = ["tiny", "tiny-joint"]


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.uint8], ids=["float-clips", "uint8-clips"])
@pytest.mark.parametrize("ops", ["torch", "triton"])
@pytest.mark.parametrize("preset", PRESETS)
def test_cuda_path_reads_no_value_on_the_host(preset, ops, input_dtype):
    config = get_config(preset)
    mode = FakeTensorMode()
    compiled = fake_cuda_module(STT(config).eval(), ops, torch.float16, mode)
    with mode:
        x = torch.empty(3, config.num_frames, 3, config.image_size, config.image_size, device="cuda",
                        dtype=input_dtype)
        logits = compiled(x)
        assert logits.shape == (3, config.num_classes) and logits.device.type == "cuda"
        assert logits.dtype == torch.float32
        # the guard itself: reading a value does raise here, so the call above read none
        with pytest.raises(DataDependentOutputException):
            bool(torch.isfinite(x).all())


def test_the_host_check_the_cuda_path_avoids_would_read_values():
    """The value check that forward() skips for device tensors is the one that would sync."""
    config = get_config("tiny")
    with FakeTensorMode():
        x = torch.empty(1, config.num_frames, 3, config.image_size, config.image_size, device="cuda")
        check_clips(x, config, values_on_device=False)
        with pytest.raises(DataDependentOutputException):
            torch.isfinite(x).all().item()


def test_nonfinite_device_clips_give_nan_rows():
    """On a GPU a clip with NaN/inf gets NaN logits and its neighbours their own. Shown on the CPU: the
    program stays here, the module is told its device is a GPU, which selects the device-side branch."""
    config = get_config("tiny")
    model = trained_looking(config)
    compiled = stt_fast.compile(model, backend="torch", validate=False)
    compiled.device = torch.device("cuda", 0)
    x = clips(config, batch=3)
    x[1, 0, 0, 0, 0] = math.inf
    with torch.no_grad():
        logits = compiled._infer(x)
        expected = model(x[[0, 2]])
    assert torch.isnan(logits[1]).all()
    torch.testing.assert_close(logits[[0, 2]], expected, rtol=1e-4, atol=1e-5)


def test_cpu_clips_are_still_refused_with_a_clear_error():
    config = get_config("tiny")
    compiled = stt_fast.compile(trained_looking(config), backend="torch", validate=False)
    x = clips(config)
    x[0, 0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        compiled(x)


def _dynamic_batch():
    return {"clips": {0: torch.export.Dim("batch", min=1, max=256)}}


@pytest.mark.parametrize("preset", PRESETS)
def test_reference_torch_export_with_a_dynamic_batch(preset):
    config = get_config(preset)
    model = trained_looking(config)
    program = torch.export.export(model, (clips(config, 2),), dynamic_shapes=_dynamic_batch())
    for batch in (1, 5):
        x = clips(config, batch)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-6)


def _ort_logits(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("preset", PRESETS)
def test_reference_onnx_export_runs_at_other_batch_sizes(preset, exporter, tmp_path):
    config = get_config(preset)
    model = trained_looking(config)
    path = tmp_path / "stt.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(model, (clips(config, 2),), str(path), dynamo=True, dynamic_shapes=_dynamic_batch(),
                              verbose=False)
        else:  # traced at batch 1: the batch size must not be frozen into the graph
            torch.onnx.export(model, (clips(config, 1),), str(path), dynamo=False, input_names=["clips"],
                              output_names=["logits"], dynamic_axes={"clips": {0: "batch"}})
    for batch in (1, 5):
        x = clips(config, batch)
        with torch.no_grad():
            torch.testing.assert_close(_ort_logits(path, x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_reference_torch_compile_fullgraph():
    config = get_config("tiny")
    model = trained_looking(config)
    compiled = torch.compile(model, fullgraph=True)
    x = clips(config, 2)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,exact", [(torch.float32, True), (torch.float16, False)], ids=["fp32", "fp16"])
def test_a_float32_program_runs_without_tf32_and_the_users_settings_come_back(dtype, exact):
    """cuDNN runs float32 convolutions in TF32 by default (6e-4 on the paper model's logits, over the 1e-4
    tolerance): during a float32 program's call on CUDA, TF32 is off for convolutions and products; before and
    after, the settings are the user's. A half-precision program leaves them alone."""
    from stt_fast.compiler import CompiledSTT
    from stt_fast.compiler.precision import tf32_in_force

    config = get_config("tiny")
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(tf32_in_force())
            return torch.zeros(x.shape[0], config.num_classes, device=x.device)

    compiled = CompiledSTT(Recorder(), config=config, device=torch.device("cuda", 0), dtype=dtype, backend="torch")
    before = tf32_in_force()
    assert before, "PyTorch's default: TF32 for cuDNN's float32 convolutions"
    with FakeTensorMode():
        compiled(torch.empty(2, config.num_frames, 3, config.image_size, config.image_size, device="cuda",
                             dtype=torch.uint8))
    assert seen == [not exact] and tf32_in_force() == before
