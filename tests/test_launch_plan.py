"""`stt-fast kernels plan`: the launches of one forward on fake CUDA tensors, counted by rules a GPU would
follow, and kept from growing unnoticed against the committed plan."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from stt_fast.kernels import st_attention
from torch._subclasses.fake_tensor import FakeTensorMode

from stt_fast.bounds import attention_work, gpu_spec, roofline
from stt_fast.config import get_config
from stt_fast.launch_plan import (
    MEMORY_LATENCY_US,
    Launch,
    fake_cuda,
    forward_launches,
    launch_microseconds,
    modelled_microseconds,
    trace_launches,
)

ROOT = Path(__file__).resolve().parent.parent


def _trace(build, *shapes, dtype=torch.float16):
    mode = FakeTensorMode()
    module = build()
    module = fake_cuda(module, dtype, mode) if isinstance(module, torch.nn.Module) else module
    with mode:
        inputs = [torch.empty(*s, device="cuda", dtype=dtype) for s in shapes]
    return trace_launches(lambda: module(*inputs), mode)


def test_a_convolution_with_bias_is_two_launches_as_on_cudnn_and_views_are_none():
    with_bias = _trace(lambda: torch.nn.Conv2d(3, 8, 3, bias=True), (2, 3, 10, 10))
    without = _trace(lambda: torch.nn.Conv2d(3, 8, 3, bias=False), (2, 3, 10, 10))
    assert [x.op for x in with_bias] == ["aten.convolution", "aten.add_ (conv bias)"]
    assert [x.op for x in without] == ["aten.convolution"]
    assert with_bias[0].flops == without[0].flops == 2 * 2 * 8 * 8 * 8 * 3 * 3 * 3
    views = _trace(lambda: (lambda x: x.view(2, -1).t().unsqueeze(0).transpose(1, 2)), (2, 3, 4))
    assert views == [], "views and metadata launch nothing"


def test_a_linear_layer_counts_its_flops_and_bytes():
    launches = _trace(lambda: torch.nn.Linear(64, 32), (5, 64))
    assert len(launches) == 1 and launches[0].op == "aten.addmm" and launches[0].kind == "gemm"
    assert launches[0].flops == 2 * 5 * 64 * 32
    assert launches[0].bytes_read == 2 * (5 * 64 + 64 * 32 + 32) and launches[0].bytes_written == 2 * 5 * 32


@pytest.mark.parametrize("mode", ["joint", "spatial"])
def test_the_fused_attention_is_one_launch_with_the_work_of_its_mode(mode):
    """One launch of the attention; spatial mode a second, tiny one: the mean of the frames' cls shares."""
    def attend(qkv):
        q, k, v = qkv.unbind(2)
        return st_attention(q, k, v, num_frames=3, mode=mode)

    launches = _trace(lambda: attend, (2, 16, 3, 4, 16))
    extra = ["stt_fast.spatial_cls_mean"] if mode == "spatial" else []
    assert [x.op for x in launches] == ["stt_fast.st_attention", *extra]
    assert launches[0].flops == attention_work(mode, 2, 3, 5, 4, 16, 2)[0]
    if mode == "spatial":
        assert launches[1].programs == 2 * 4 and launches[1].bytes_read == 2 * 4 * 3 * 16 * 4


def test_modelled_time_is_the_roofline_plus_the_floor():
    h100 = gpu_spec("H100 SXM")
    launches = [Launch("a", "gemm", 10**9, 10**6, 10**6, "1"), Launch("b", "elementwise", 0, 4 * 10**6, 0, "1")]
    expected = sum(roofline(h100, x.flops, x.bytes, "fp16").microseconds + 2.0 for x in launches)
    assert modelled_microseconds(launches, "H100 SXM", "fp16", 2.0) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no datasheet entry"):
        modelled_microseconds(launches, "B200", "fp16", 2.0)


def test_a_launch_with_few_programs_gets_a_share_of_the_gpu():
    """8 programs on the H100's 132 SMs: 8/132 of the compute and 4 x 8/132 of the bandwidth; a grid that
    fills the SMs gets the roofline; a chain of dependent reads costs its round trips whatever the work."""
    h100 = gpu_spec("H100 SXM")
    assert h100.sms == 132
    work = dict(op="k", kind="gemm", flops=10**9, bytes_read=10**7, bytes_written=0, shape="1")
    full = Launch(**work, programs=132, serial=1, serial_total=132)
    few = Launch(**work, programs=8, serial=1, serial_total=8)
    library = Launch(**work)
    assert launch_microseconds(full, h100, "fp16", 0.0) == pytest.approx(
        launch_microseconds(library, h100, "fp16", 0.0))
    assert launch_microseconds(few, h100, "fp16", 0.0) == pytest.approx(
        10**9 / (989e12 * 8 / 132) * 1e6)  # compute-bound at 8/132 of the peak
    chained = Launch(**{**work, "flops": 0, "bytes_read": 0}, programs=8, serial=64, serial_total=8 * 64)
    assert launch_microseconds(chained, h100, "fp16", 2.0) == pytest.approx(2.0 + 64 * MEMORY_LATENCY_US)
    crowd = Launch(**{**work, "flops": 0, "bytes_read": 0}, programs=132 * 40, serial=10, serial_total=132 * 400)
    assert launch_microseconds(crowd, h100, "fp16", 0.0) == pytest.approx(400 / 4 * MEMORY_LATENCY_US)


def test_the_cls_attention_is_three_launches_that_cover_the_gpu():
    """Query, partials, combine: at batch 1 the partials' grid covers the H100 (112 programs for the paper's
    spatial block: 7 splits of 16 frames), and no launch of the three waits on more than 11 reads in a row
    (the one-kernel form: 8 programs, 64 passes)."""
    launches = forward_launches(get_config("paper"), backend="triton", batch=1, dtype=torch.float16)
    cls = [x for x in launches if x.op.startswith("stt_fast.cls_")]
    assert [x.op for x in cls] == ["stt_fast.cls_query", "stt_fast.cls_partials", "stt_fast.cls_combine"]
    assert cls[1].programs == 112 and cls[0].programs == cls[2].programs == 8
    assert max(x.serial for x in cls) <= 11


def test_the_max_pool_writes_no_indices():
    launches = forward_launches(get_config("paper"), backend="triton", batch=2, dtype=torch.float16)
    pools = [x for x in launches if "max_pool" in x.op]
    assert [x.op for x in pools] == ["stt_fast.max_pool2d"]
    assert pools[0].bytes_written == 2 * 16 * 64 * 28 * 28 * 2, "the fp16 maxima only"


def test_profiled_kernels_are_compared_with_the_plan_per_family():
    """What the selftest does with torch.profiler's kernels on a GPU, on a list of names and times: stt_fast's
    Triton kernels by function name, the rest as library kernels, each family's time against the plan's."""
    from stt_fast.launch_plan import compare_kernels, kernel_family

    assert kernel_family("_cls_partials_kernel") == "stt_fast.cls_partials"
    assert kernel_family("_st_attention_kernel") == "stt_fast.st_attention"
    assert kernel_family("sm90_xmma_fprop_implicit_gemm_f16f16") == "library"
    h100 = gpu_spec("H100 SXM")
    planned = [Launch("stt_fast.fused_linear", "gemm", 10**9, 10**6, 10**6, "1", 132, 1, 132),
               Launch("stt_fast.fused_linear", "gemm", 10**9, 10**6, 10**6, "1", 132, 1, 132),
               Launch("aten.convolution", "conv", 10**9, 10**6, 0, "1")]
    rows = {r["family"]: r for r in compare_kernels(
        planned, [("_fused_linear_kernel", 30.0), ("_fused_linear_kernel", 10.0), ("cudnn_conv", 1.0)], h100,
        "fp16")}
    linear = rows["stt_fast.fused_linear"]
    assert (linear["planned"], linear["measured"], linear["measured_us"]) == (2, 2, 40.0)
    assert linear["modelled_us"] == pytest.approx(2 * launch_microseconds(planned[0], h100, "fp16", 0.0), abs=0.1)
    assert linear["measured_over_modelled"] == pytest.approx(40.0 / linear["modelled_us"], rel=0.01)
    assert rows["library"]["planned"] == rows["library"]["measured"] == 1


def _committed(config_name):
    plans = sorted((ROOT / "benchmarks" / "results" / "launch-plan").glob(f"*-{config_name}.json"))
    assert plans, f"no committed launch plan for {config_name}: run `stt-fast kernels plan --output benchmarks/results`"
    return json.loads(plans[-1].read_text())


@pytest.mark.parametrize("backend,batch", [("triton", 1), ("triton", 64), ("torch", 1)])
def test_the_plan_does_not_grow_past_the_committed_one(backend, batch):
    """Launches and bytes of the paper model's forward, against the newest committed plan: a change that
    adds launches or traffic fails here until the plan is regenerated and committed (and looked at)."""
    committed = {(r["backend"], r["batch"]): r for r in _committed("paper")["rows"]}[(backend, batch)]
    launches = forward_launches(get_config("paper"), backend=backend, batch=batch, dtype=torch.float16)
    assert len(launches) <= committed["launches"], [x.op for x in launches]
    assert sum(x.bytes for x in launches) <= committed["bytes"] * 1.0001


def test_the_command_writes_json_and_markdown_labelled_as_a_model(tmp_path):
    entry = os.path.join(os.path.dirname(sys.executable), "stt-fast")
    result = subprocess.run([entry, "kernels", "plan", "--config", "tiny", "--batch", "1,2", "--gpus", "L4",
                             "--output", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    plan = json.loads(next((tmp_path / "launch-plan").glob("*-tiny.json")).read_text())
    assert plan["kind"].startswith("launch plan (a model") and plan["gpus"] == ["L4"]
    assert {(r["backend"], r["batch"]) for r in plan["rows"]} == {(b, n) for b in ("triton", "torch", "reference")
                                                                  for n in (1, 2)}
    assert "A model, not a measurement" in result.stdout
    bad = subprocess.run([entry, "kernels", "plan", "--gpus", "B200"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown GPU" in bad.stderr and "Traceback" not in bad.stderr
