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
from stt_fast.launch_plan import Launch, fake_cuda, forward_launches, modelled_microseconds, trace_launches

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


def test_the_fused_attention_is_one_launch_with_the_work_of_its_mode():
    def attend(qkv):
        q, k, v = qkv.unbind(2)
        return st_attention(q, k, v, num_frames=3, mode="spatial")

    launches = _trace(lambda: attend, (2, 16, 3, 4, 16))
    assert [x.op for x in launches] == ["stt_fast.st_attention"]
    assert launches[0].flops == attention_work("spatial", 2, 3, 5, 4, 16, 2)[0]


def test_modelled_time_is_the_roofline_plus_the_floor():
    h100 = gpu_spec("H100 SXM")
    launches = [Launch("a", "gemm", 10**9, 10**6, 10**6, "1"), Launch("b", "elementwise", 0, 4 * 10**6, 0, "1")]
    expected = sum(roofline(h100, x.flops, x.bytes, "fp16").microseconds + 2.0 for x in launches)
    assert modelled_microseconds(launches, "H100 SXM", "fp16", 2.0) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no datasheet entry"):
        modelled_microseconds(launches, "B200", "fp16", 2.0)


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
