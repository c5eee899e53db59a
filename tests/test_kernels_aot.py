"""GPU facts without a GPU: ahead-of-time compiles of every kernel candidate for real targets (the CI gate),
the checks that read them, and the physical bounds per GPU type.

The compiles run in a subprocess without TRITON_INTERPRET (interpreted kernels cannot be compiled), with
a fresh Triton cache (a cached kernel is not compiled again, and ptxas would report nothing)."""

import json
import os
import subprocess
import sys

import pytest
from stt_fast.kernels.aot import GATE_TARGETS, Case, Facts, check, main_configs, problems
from stt_fast.kernels.fused_linear_configs import CANDIDATES as LINEAR_FP16
from stt_fast.kernels.fused_linear_configs import CANDIDATES_FP32 as LINEAR_FP32
from stt_fast.kernels.st_attention_configs import CANDIDATES, CANDIDATES_FP32, EXCLUDED, candidates

from stt_fast.bounds import GPUS, SHARED_MEMORY_PER_BLOCK, attention_work, gpu_spec, program_bound, roofline
from stt_fast.config import get_config


def _without_interpreter(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return env


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    """`stt-fast kernels aot --check` at the paper's shapes for the gate targets, fp16 and fp32."""
    out = tmp_path_factory.mktemp("aot")
    stt_fast = os.path.join(os.path.dirname(sys.executable), "stt-fast")
    result = subprocess.run([stt_fast, "kernels", "aot", "--targets", ",".join(GATE_TARGETS), "--dtypes", "fp16,fp32",
                             "--check", "--output", str(out), "--quiet"], capture_output=True, text=True,
                            env=_without_interpreter(out), timeout=900)
    written = list(out.glob("kernels-aot/*.json"))
    return result, json.loads(written[0].read_text()) if written else None


@pytest.mark.slow
def test_the_gate_passes_for_every_candidate_the_tables_can_choose(gate):
    result, report = gate
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Gate: passed" in result.stdout and report["gate_problems"] == []
    compiled = {(c["target"], c["case"]["mode"], tuple(c["case"]["config"]), c["case"]["dtype"]): c
                for c in report["compiles"]}
    for target in GATE_TARGETS:
        limit = SHARED_MEMORY_PER_BLOCK[f"{target[3]}.{target[4]}"]
        for dtype, table in (("fp16", CANDIDATES), ("fp32", CANDIDATES_FP32)):
            for mode in table:
                for config in candidates(mode, 785, 16, 49, (int(target[3]), int(target[4])), dtype):
                    facts = compiled[(target, mode, tuple(config), dtype)]
                    assert facts["error"] is None and facts["registers"] is not None
                    assert facts["spill_stores"] == facts["spill_loads"] == 0, (target, mode, config, dtype)
                    assert facts["shared_bytes"] <= limit
                    if dtype == "fp32":
                        assert facts["tf32_instructions"] == 0, "float32 must use IEEE products"
                    elif target == "sm_90" and mode in ("joint", "spatial") and config in main_configs(mode):
                        assert facts["wgmma"] > 0, (mode, config)
                    else:
                        assert facts["tensor_cores"] != "none"
    layer_norm = [c for c in report["compiles"] if c["case"]["kernel"] == "add_layer_norm"]
    assert len(layer_norm) == 2 * len(GATE_TARGETS) and all(c["problems"] == [] for c in layer_norm)
    linear = [c for c in report["compiles"] if c["case"]["kernel"] == "fused_linear"]
    assert len(linear) == 3 * (len(LINEAR_FP16) + len(LINEAR_FP32)) * len(GATE_TARGETS)
    for c in linear:
        assert c["problems"] == [] and c["spill_stores"] == c["spill_loads"] == 0, c["case"]["name"]
        if c["case"]["dtype"] == "fp32":
            assert c["tf32_instructions"] == 0
        elif c["target"] == "sm_90" and c["case"]["config"][0] >= 64:
            assert c["wgmma"] > 0, c["case"]["name"]
        else:
            assert c["tensor_cores"] != "none", (c["target"], c["case"]["name"])
    cls = [c for c in report["compiles"] if c["case"]["kernel"] == "cls_attention"]
    assert len(cls) == 3 * 2 * len(GATE_TARGETS) and all(c["problems"] == [] for c in cls)
    assert all(c["spill_stores"] == c["spill_loads"] == 0 and c["tf32_instructions"] == 0 for c in cls)
    pool = [c for c in report["compiles"] if c["case"]["kernel"] == "max_pool2d"]
    assert len(pool) == 2 * len(GATE_TARGETS) and all(c["problems"] == [] for c in pool)
    mean = [c for c in report["compiles"] if c["case"]["kernel"] == "spatial_cls_mean"]
    assert len(mean) == 2 * len(GATE_TARGETS) and all(c["problems"] == [] for c in mean)


@pytest.mark.slow
def test_a_float32_kernel_forced_to_tf32_is_caught(tmp_path):
    """The PTX check is real: compile the joint float32 kernel with TF32 asked for, and the gate objects."""
    script = """
import importlib
import sys
from stt_fast.config import get_config
from stt_fast.kernels import aot

impl = importlib.import_module("stt_fast.kernels.st_attention")
original = impl.kernel_arguments
impl.kernel_arguments = lambda *args, **kwargs: original(*args, **kwargs) | {"PRECISION": "tf32"}
config = aot.LaunchConfig(*map(int, sys.argv[1:]))
facts = aot.compile_case(aot.Case("st_attention", "joint", config, "fp32"), "sm_80", get_config("paper"))
print(facts.tf32_instructions, aot.problems(facts))
"""
    result = subprocess.run([sys.executable, "-c", script, *map(str, CANDIDATES_FP32["joint"][0])],
                            capture_output=True, text=True, env=_without_interpreter(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    count, found = result.stdout.strip().split(" ", 1)
    assert int(count) > 0 and "TF32" in found


def _facts(**over):
    base = dict(case=Case("st_attention", "joint", CANDIDATES["joint"][0], "fp16"), target="sm_90", registers=120,
                spill_stores=0, spill_loads=0, stack_bytes=0, shared_bytes=64 * 1024,
                shared_limit=SHARED_MEMORY_PER_BLOCK["9.0"], tensor_cores="wgmma", wgmma=8)
    base.update(over)
    return Facts(**base)


@pytest.mark.parametrize("change,expected", [
    (dict(spill_stores=8, spill_loads=8), "spills 8 B"),
    (dict(shared_bytes=300 * 1024), "shared memory"),
    (dict(wgmma=0, tensor_cores="mma.sync"), "no wgmma"),
    (dict(error="PTXASError: boom"), "does not compile"),
    (dict(registers=None), "ptxas reported nothing"),
    (dict(case=Case("st_attention", "joint", CANDIDATES_FP32["joint"][0], "fp32"), tf32_instructions=4,
          tensor_cores="mma.sync", wgmma=0), "TF32"),
], ids=["spills", "shared-memory", "no-wgmma", "compile-error", "no-ptxas-log", "tf32"])
def test_gate_rules(change, expected):
    assert problems(_facts()) == []
    found = problems(_facts(**change))
    assert len(found) == 1 and expected in found[0]
    assert check([_facts(**change)])[0].startswith("sm_90 st_attention-joint")
    assert problems(_facts(excluded="left out on purpose", **change)) == [], "an excluded candidate is not gated"


def test_per_architecture_exclusions_take_candidates_out_on_that_target_only(monkeypatch):
    first = CANDIDATES["spatial"][0]
    monkeypatch.setitem(EXCLUDED, (8, 0), {"spatial": {first: "spills on sm_80"}})
    assert first not in candidates("spatial", 785, 16, 49, (8, 0))
    assert first in candidates("spatial", 785, 16, 49, (9, 0))
    assert candidates("spatial", 785, 16, 49, None)[0] == first, "the interpreter is not a target"


def test_gpu_table_matches_device_names():
    assert gpu_spec("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert gpu_spec("NVIDIA A100-SXM4-40GB").name == "A100 40GB"
    assert gpu_spec("NVIDIA A10").name == "A10" and gpu_spec("NVIDIA L40S") is None
    assert gpu_spec("Tesla T4").name == "T4"
    assert gpu_spec("Orin", 61.4).name == "Jetson AGX Orin 64GB"
    assert gpu_spec("Orin", 7.4).name.startswith("Jetson Orin Nano")
    assert all(spec.source for spec in GPUS)


def test_roofline_bounds():
    h100 = gpu_spec("NVIDIA H100 80GB HBM3")
    flops, nbytes = attention_work("temporal", 1, 16, 49, 8, 64, 2)
    assert flops == 4 * 8 * 64 * 49 * 16 * 16 and nbytes == 4 * 785 * 8 * 64 * 2
    bound = roofline(h100, flops, nbytes, "fp16")
    assert bound.limited_by == "memory" and bound.microseconds == pytest.approx(nbytes / 3350e9 * 1e6)
    program = program_bound("NVIDIA H100 80GB HBM3", get_config("paper"), 64, "fp16")
    assert program.limited_by == "compute" and program.microseconds == pytest.approx(program.flops / 989e12 * 1e6)
    assert program_bound("NVIDIA GeForce RTX 4090", get_config("paper"), 1, "fp16") is None
    assert program_bound("Tesla T4", get_config("paper"), 1, "bf16") is None, "the T4 has no bfloat16 tensor cores"



@pytest.mark.slow
def test_batch_and_row_offsets_are_64_bit_in_the_compiled_kernels(tmp_path):
    """b * stride_qb passes 2**31 from batch 1,782 with packed qkv at the paper's shape, row * stride_x of
    add_layer_norm above 4.19 M rows, fused_linear's rows * K from batch 1,336 (fc2), cls_attention's clip *
    stride from batch 5,344: the TTIR of an sm_90 compile must form those products in i64.
    (Mutation: drop the .to(tl.int64) in any kernel and its products are i32.)"""
    script = """
import re
from stt_fast.config import get_config
from stt_fast.kernels import aot

config = get_config("paper")
products = {"st_attention": ("b", ("q_base", "k_base", "v_base", "o_base")), "add_layer_norm": ("row", ("y",)),
            "fused_linear": ("rows", ("rows",)), "cls_attention": ("clip", ("x_base",))}
for case in (aot.Case("st_attention", "spatial", aot.LaunchConfig(64, 64, 4, 1), "fp16"),
             aot.Case("st_attention", "temporal", aot.LaunchConfig(64, 64, 4, 1), "fp16"),
             aot.layer_norm_cases(config, ["fp16"])[0], aot.linear_cases(config, ["fp16"])[0],
             aot.cls_attention_cases(config, ["fp16"])[0]):
    ttir = aot.compile_kernel(case, "sm_90", config).asm["ttir"]
    index, names = products[case.kernel]
    pattern = r"%{}(?:_\\d+)? = arith\\.muli %{}(?:_\\d+)?, .* : (i\\d+)"
    widths = [sorted(set(re.findall(pattern.format(name, index), ttir))) for name in names]
    print(case.kernel, case.mode, widths)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=_without_interpreter(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines == ["st_attention spatial [['i64'], ['i64'], ['i64'], ['i64']]",
                     "st_attention temporal [['i64'], ['i64'], ['i64'], ['i64']]",
                     "add_layer_norm  [['i64']]", "fused_linear norm-gelu [['i64']]",
                     "cls_attention partials [['i64']]"], result.stdout
