"""`stt-fast selftest`: everything a GPU can verify, in one command, written to one folder.

No GPU has run this project's GPU code yet. Whoever has one runs `stt-fast selftest` (or `make selftest`)
and sends back the folder it writes (SUMMARY.md first). Items, each passed, failed or skipped with the
reason:

    kernels        st_attention (every mode x dtype x head dim; whole output, worst row, cls rows),
                   fused_linear (the model's specialisations), cls_attention (planned and single splits),
                   add_layer_norm and max_pool2d on the
                   device against float64 references, and on a GPU every candidate of the launch tables
                   forced once at the paper's shape (batch 2, 8 heads); on a CPU, the small shapes through
                   Triton's interpreter (a subprocess)
    cuda-graphs    the compiled module with CUDA graphs across batch sizes: logits and the graph cache
    backends       stt_fast.compile with validation, every backend and precision this machine has
    no-host-sync   steady-state calls with torch.cuda.set_sync_debug_mode("error"); on a CPU, the CUDA
                   path traced on fake CUDA tensors (a data-dependent branch would raise there)
    devices        triton and tensorrt backends on the last of several GPUs (not the current device)
    launch-plan    torch.profiler's kernels of one forward beside `stt-fast kernels plan`'s launches
    kernel-bench   the st_attention microbenchmark (fraction of the roofline bound on a known GPU)
    bench          the benchmark suite, batch 1, 8 and 64 on a GPU (the tiny config, batch 1 and 8, on a CPU)
    tensorrt       export -> FP16 engine build -> check of the config's model (TensorRT and a GPU)
    aot            the ahead-of-time compile facts for this GPU's architecture

The folder holds SUMMARY.md (machine header, one line per item), selftest.json, and each item's own
results (benchmark JSON, compile matrix).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import STTConfig, get_config
from .files import write_text_atomic


@dataclass
class Item:
    name: str
    status: str = "skipped"  # "passed", "failed" or "skipped"
    detail: str = ""  # what was checked, or why it was skipped / failed
    seconds: float = 0.0


class Skip(Exception):
    """An item that cannot run on this machine, with the reason."""


def _model(config: STTConfig, seed: int = 0):
    from .model import STT

    torch.manual_seed(seed)
    model = STT(config).eval()
    with torch.no_grad():  # BatchNorm statistics away from their initial values, as after training
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


# --- the items -----------------------------------------------------------------------------------------

KERNEL_CHECK = r"""
import importlib, json, sys, torch
from stt_fast.accuracy import assert_kernel_close
from stt_fast.kernels import (add_layer_norm, add_layer_norm_reference, cls_attention, cls_attention_reference,
                              fused_linear_reference, max_pool2d, st_attention, st_attention_reference)
from stt_fast.kernels.fused_linear import _fused_linear
from stt_fast.kernels.fused_linear_configs import candidate_table as linear_table
from stt_fast.kernels.st_attention_configs import candidate_table, fitting
impl = importlib.import_module("stt_fast.kernels.st_attention")
device = sys.argv[1]
full = sys.argv[2] == "full"
torch.manual_seed(int(sys.argv[3]))
shapes = [(2, 3, 5, 2), (2, 16, 49, 8)] if full else [(2, 3, 5, 2)]
worst, checked = {}, 0

def check(out, ref, dtype, key, **rows):
    # the whole output, its worst row (and for attention the cls rows): a norm over the whole hides one wrong row
    errors = assert_kernel_close(out, ref, dtype, key, scope="selftest", **rows)
    for kind, err in errors.items():
        worst[f"{key} {kind}"] = max(worst.get(f"{key} {kind}", 0.0), err)

def compare(out, q, k, v, t, mode, dtype, key):
    global checked
    ref = st_attention_reference(*(x.cpu().double() for x in (q, k, v)), num_frames=t, mode=mode)
    check(out, ref, dtype, key, row_dims=2, cls_rows=True)
    checked += 1

for dtype in (torch.float16, torch.bfloat16, torch.float32):
    for head_dim in (16, 32, 64, 128):
        for b, t, n, h in shapes:
            qkv = torch.randn(b, 1 + t * n, 3, h, head_dim, dtype=dtype, device=device)
            q, k, v = qkv.unbind(2)
            for mode in ("joint", "spatial", "temporal"):
                out = st_attention(q, k, v, num_frames=t, mode=mode)
                compare(out, q, k, v, t, mode, dtype, f"st_attention {mode} {str(dtype)[6:]} Dh{head_dim} T{t} N{n}")
    x, delta = (torch.randn(3, 21, 512, dtype=dtype, device=device) for _ in range(2))
    w, bias = (torch.randn(512, dtype=dtype, device=device) for _ in range(2))
    y, z = add_layer_norm(x, delta, w, bias, 1e-6, cls_period=21)
    y_ref, z_ref = add_layer_norm_reference(*(a.cpu().double() for a in (x, delta, w, bias)), 1e-6, cls_period=21)
    check(y, y_ref, dtype, f"add_layer_norm sum {str(dtype)[6:]}")
    check(z, z_ref, dtype, f"add_layer_norm normalised {str(dtype)[6:]}")
# fused_linear with its model's specialisations (LayerNorm + GELU; residual keeping cls rows; token rows;
# float32 logits) and cls_attention in both modes; at the paper's shapes when full, misaligned ones always
rows, dim, hidden = (785, 512, 2048) if full else (37, 48, 72)
linear_checks = 0
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    a = torch.randn(2 * rows, dim, dtype=dtype, device=device) * 2 + 0.3
    w1, w2 = (torch.randn(n, k, dtype=dtype, device=device) * k ** -0.5 for n, k in ((hidden, dim), (dim, hidden)))
    b1, b2, g, nb = (torch.randn(n, dtype=dtype, device=device) for n in (hidden, dim, dim, dim))
    table = torch.randn(rows, dim, dtype=dtype, device=device)
    patches = torch.randn(2 * (rows - 1), hidden, dtype=dtype, device=device)
    res = torch.randn(2 * rows, dim, dtype=dtype, device=device)
    h = torch.randn(2 * rows, hidden, dtype=dtype, device=device)
    cases = {"norm+gelu": ((a, w1, b1), dict(norm=(g, nb, 1e-6), gelu=True)),
             "residual cls kept": ((h, w2, b2), dict(residual=res, cls_period=rows)),
             "tokens": ((patches, w2, table), dict(tokens=rows)),
             "head float32": ((a, w2.t().contiguous()[:7], b2[:7]), dict(norm=(g, nb, 1e-6), out_dtype=torch.float32))}
    for name, (args, kwargs) in cases.items():
        cpu = lambda t: t.cpu().double() if isinstance(t, torch.Tensor) else t
        kw64 = {k: tuple(map(cpu, v)) if isinstance(v, tuple) else cpu(v) for k, v in kwargs.items()}
        kw64.pop("out_dtype", None)
        ref = fused_linear_reference(*map(cpu, args), **kw64)
        norm = kwargs.get("norm", (None, None, 0.0))
        configs = linear_table("fp32" if dtype == torch.float32 else "fp16") if full else [None]
        for config in configs:
            out = _fused_linear(*args, norm[0], norm[1], norm[2], kwargs.get("gelu", False), kwargs.get("residual"),
                                kwargs.get("cls_period", 0), kwargs.get("tokens", 0), kwargs.get("out_dtype"),
                                config=config)
            check(out, ref, dtype, f"fused_linear {name} {str(dtype)[6:]}" + (f" {tuple(config)}" if config else ""))
            linear_checks += 1
    t, n, heads = (16, 49, 8) if full else (3, 5, 4)
    x = torch.randn(2, 1 + t * n, dim if full else 64, dtype=dtype, device=device) * 2 + 0.5
    d = x.shape[-1]
    g, nb = torch.rand(d, dtype=dtype, device=device) + 0.5, torch.randn(d, dtype=dtype, device=device) * 0.1
    wqkv, bqkv = torch.randn(3 * d, d, dtype=dtype, device=device) * d ** -0.5 * 2, torch.randn(3 * d, dtype=dtype,
                                                                                                 device=device)
    for mode in ("spatial", "joint"):
        ref = cls_attention_reference(*(v.cpu().double() for v in (x, g, nb)), 1e-6, wqkv.cpu().double(),
                                      bqkv.cpu().double(), num_heads=heads, num_frames=t, mode=mode)
        for splits in (None, 1):  # the device's split plan, and one program per softmax group
            out = cls_attention(x, g, nb, 1e-6, wqkv, bqkv, num_heads=heads, num_frames=t, mode=mode, splits=splits)
            check(out, ref, dtype, f"cls_attention {mode} {str(dtype)[6:]} splits {splits or 'planned'}")
            linear_checks += 1
    # the max-pool without indices: a max is exact, so bit-equal to PyTorch's on the same device
    stem = (torch.randn(2 * t, 64, 56 if full else 11, 56 if full else 9, device=device) * 3).to(dtype).to(
        memory_format=torch.channels_last)
    assert torch.equal(max_pool2d(stem, 3, 2, 1), torch.nn.functional.max_pool2d(stem, 3, 2, 1)), f"max_pool2d {dtype}"
candidates = 0
if full:  # every candidate of the launch tables, forced, at the paper's shape (batch 2, 8 heads)
    for dtype, name in ((torch.float16, "fp16"), (torch.float32, "fp32")):
        q, k, v = torch.randn(2, 785, 3, 8, 64, dtype=dtype, device=device).unbind(2)
        for mode, table in candidate_table(name).items():
            for config in fitting(mode, 785, 16, 49, name):
                out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
                shape = impl.check_kernel_inputs(q, k, v, num_frames=16, mode=mode)
                impl._launch(q, k, v, out, shape, mode, 64**-0.5, config=config)
                compare(out, q, k, v, 16, mode, dtype, f"candidate {mode} {name} {tuple(config)}")
                candidates += 1
fused = 0
if device.startswith("cuda"):  # the cuDNN fused routes against the unfused ops, in float64
    from stt_fast.compiler.conv_ops import conv_bias_relu, conv_bias_relu_reference
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(2, 64, 28, 28, dtype=dtype, device=device).to(memory_format=torch.channels_last)
        w = (torch.randn(64, 64, 3, 3, dtype=dtype, device=device) * 0.05).to(memory_format=torch.channels_last)
        b, r = torch.randn(64, dtype=dtype, device=device), torch.randn_like(x)
        for residual in (None, r):
            # freed memory poisoned with NaN first: cudnn_convolution_relu hands cuDNN its uninitialised output as
            # the (alpha 0) add input; an engine computing 0 x NaN would give NaN, caught here
            poison = [torch.full_like(x, float("nan")) for _ in range(8)]
            del poison
            got = conv_bias_relu(x, w, b, [1, 1], [1, 1], residual)
            assert torch.isfinite(got).all(), f"conv_bias_relu {dtype} gave NaN over NaN-poisoned memory"
            ref = conv_bias_relu_reference(*(t.double() for t in (x, w, b)), [1, 1], [1, 1],
                                           None if residual is None else residual.double())
            check(got, ref, dtype, f"conv_bias_relu {str(dtype)[6:]} {'add' if residual is not None else 'plain'}")
            fused += 1
print(json.dumps({"checked": checked, "linear_checks": linear_checks, "candidates": candidates, "fused_routes": fused,
                  "worst_relative_error": worst}))
"""


def item_kernels(device: torch.device, out: Path, config: STTConfig, quick: bool, seed: int = 0) -> str:
    env = dict(os.environ)
    if device.type == "cpu":
        env["TRITON_INTERPRET"] = "1"  # must be set before triton is imported: hence the subprocess
    else:
        env.pop("TRITON_INTERPRET", None)
    full = "small" if device.type == "cpu" or quick else "full"
    result = subprocess.run([sys.executable, "-c", KERNEL_CHECK, str(device), full, str(seed)], capture_output=True,
                            text=True, env=env, timeout=3600)
    if result.returncode:
        raise AssertionError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    write_text_atomic(out / "kernels.json", json.dumps(report, indent=1))
    where = "on the GPU" if device.type == "cuda" else "through Triton's interpreter (CPU)"
    worst = max(report["worst_relative_error"].items(), key=lambda kv: kv[1])
    forced = f", every launch-table candidate forced once ({report['candidates']})" if report["candidates"] else ""
    if report.get("fused_routes"):
        forced += (", the cuDNN conv+bias+ReLU(+add) routes against the unfused ops (over freed memory poisoned "
                   "with NaN)")
    return (f"{report['checked']} st_attention checks (3 modes x fp16/bf16/fp32 x head dims 16-128; whole output, "
            f"worst row and cls rows), {report['linear_checks']} fused_linear and cls_attention checks, "
            f"add_layer_norm and max_pool2d (bit-equal to PyTorch's) {where}{forced}; largest relative error "
            f"{worst[1]:.1e} ({worst[0]}); inputs drawn with seed {seed} (--seed replays them)")


def item_cuda_graphs(device: torch.device, out: Path, config: STTConfig, quick: bool) -> str:
    if device.type != "cuda":
        raise Skip("CUDA graphs need a CUDA GPU")
    import stt_fast
    from stt_fast.accuracy import relative_error, tolerance

    model = _model(get_config("tiny"))
    compiled = stt_fast.compile(model.to(device), max_graphs=2)
    c = model.config
    errors = []
    for batch in (1, 2, 3, 1):
        x = torch.rand(batch, c.num_frames, 3, c.image_size, c.image_size)
        with torch.no_grad():
            errors.append(relative_error(compiled(x), model.cpu()(x)))
        model.to(device)
    if max(errors) > tolerance(compiled.dtype).model:
        raise AssertionError(f"logits through CUDA graphs differ from the reference: {max(errors):.2e}")
    shapes = [key[0][0] for key in compiled.graphs.cached()]
    if shapes != [4, 1]:
        raise AssertionError(f"graph cache holds batches {shapes}, expected [4, 1] (batch 3 runs in the graph of "
                             "4; least recently used evicted)")
    return (f"batches 1, 2, 3, 1 through {compiled.backend} with CUDA graphs (buckets 1, 2, 4): largest error "
            f"{max(errors):.1e}")


def item_backends(device: torch.device, out: Path, config: STTConfig, quick: bool) -> str:
    import stt_fast
    from stt_fast.compiler import triton_problem

    model = _model(config)
    plans = [("auto", None)]
    if device.type == "cuda":
        plans += [("triton", torch.float16), ("triton", torch.bfloat16), ("triton", torch.float32),
                  ("torch", torch.float16), ("torch", torch.float32), ("onnxruntime", torch.float32),
                  ("tensorrt", torch.float16)]
    else:
        plans += [("torch", torch.float32), ("onnxruntime", torch.float32), ("openvino", torch.float32)]
    lines, failures, records = [], [], []
    with tempfile.TemporaryDirectory(prefix="stt_fast-selftest-") as cache:
        for backend, dtype in plans:
            name = f"{backend} {str(dtype)[6:] if dtype else 'default'}"
            if backend == "triton" and triton_problem(model, device):
                lines.append(f"{name}: skipped ({triton_problem(model, device)})")
                continue
            # the exported graphs and engines go to a scratch cache (auto is onnxruntime on the CPU)
            cached = backend in ("onnxruntime", "openvino", "tensorrt") or (backend == "auto" and device.type == "cpu")
            options = {"cache_dir": cache} if cached else {}
            try:
                compiled = stt_fast.compile(model.to(device), device=device, dtype=dtype, backend=backend, **options)
            except ImportError as e:
                lines.append(f"{name}: skipped ({e})")
                continue
            except Exception as e:  # one backend failing is the finding; the others still run
                failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            report = compiled.validation
            fell_back = f", fell back: {compiled.fallback_reason}" if compiled.fallback_reason else ""
            lines.append(f"{name} -> {compiled.backend} {str(compiled.dtype)[6:]}: {report}{fell_back}")
            records.append({"asked": name, "backend": compiled.backend, "dtype": str(compiled.dtype),
                            "fallback_reason": compiled.fallback_reason, "validation": report.to_dict()})
    write_text_atomic(out / "backends.json", json.dumps({"results": records, "failures": failures}, indent=1))
    if failures:
        raise AssertionError("; ".join(failures))
    return "; ".join(lines)


def item_no_host_sync(device: torch.device, out: Path, config: STTConfig, quick: bool) -> str:
    import stt_fast

    model = _model(config)
    c = config
    if device.type == "cuda":
        lines = []
        for backend in ("triton", "torch"):
            compiled = stt_fast.compile(model.to(device), backend=backend, validate=False)
            for dtype in (torch.float32, torch.uint8):
                x = torch.rand(2, c.num_frames, 3, c.image_size, c.image_size, device=device)
                x = (x * 255).to(torch.uint8) if dtype == torch.uint8 else x
                with torch.no_grad():
                    compiled(x)  # first call: capture, autotuning (may sync)
                    torch.cuda.synchronize(device)
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        for _ in range(3):
                            compiled(x)
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                lines.append(f"{backend} {str(dtype)[6:]} clips")
        return "no host-device sync in steady-state calls (torch.cuda.set_sync_debug_mode('error')): " + \
            ", ".join(lines)
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .launch_plan import fake_cuda_module

    mode = FakeTensorMode()
    for ops in ("torch", "triton"):
        compiled = fake_cuda_module(model, ops, torch.float16, mode)
        with mode:
            compiled(torch.empty(2, c.num_frames, 3, c.image_size, c.image_size, device="cuda"))
    return ("the CUDA path (torch and triton op sets) traced on fake CUDA tensors without a data-dependent "
            "branch; on a GPU this item checks steady-state calls with set_sync_debug_mode('error')")


def item_devices(device: torch.device, out: Path, config: STTConfig, quick: bool) -> str:
    """The Triton backend and a TensorRT engine on the last CUDA device, not the current one: launches and
    TensorRT must follow the module's device (a backend that ran on cuda:0 would fail validation)."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        raise Skip("needs two CUDA GPUs or more (the module's device must differ from the current one)")
    import stt_fast

    other = torch.device("cuda", torch.cuda.device_count() - 1)
    model = _model(get_config("tiny"))
    lines = []
    for backend in ("triton", "tensorrt"):
        try:
            with tempfile.TemporaryDirectory(prefix="stt_fast-selftest-") as cache:
                options = {"cache_dir": cache} if backend == "tensorrt" else {}
                compiled = stt_fast.compile(model.to(other), device=other, backend=backend, **options)
        except ImportError as e:
            lines.append(f"{backend}: skipped ({e})")
            continue
        lines.append(f"{backend} on {other}: {compiled.validation}")
    return "; ".join(lines)


def item_launch_plan(device: torch.device, out: Path, config: STTConfig, quick: bool) -> str:
    """torch.profiler's kernel list of a steady-state forward beside the launch plan's (stt_fast.launch_plan):
    the model's launch count and time checked the first time a GPU runs it."""
    if device.type != "cuda":
        raise Skip("checking the launch plan against torch.profiler needs a CUDA GPU (the plan itself: "
                   "`stt-fast kernels plan`)")
    from collections import Counter

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    import stt_fast

    from .bounds import gpu_spec
    from .launch_plan import LAUNCH_FLOOR_US, compare_kernels, forward_launches, modelled_microseconds

    model = _model(config).to(device)
    compiled = stt_fast.compile(model, device=device, backend="triton", dtype=torch.float16, cuda_graphs=False,
                                validate=False)
    props = torch.cuda.get_device_properties(device)
    spec = gpu_spec(props.name, props.total_memory / 2**30)
    rows, lines = [], []
    for batch in (1, 8):
        planned = forward_launches(config, backend="triton", batch=batch, dtype=torch.float16)
        clips = torch.randint(0, 256, (batch, config.num_frames, 3, config.image_size, config.image_size),
                              dtype=torch.uint8, device=device)
        with torch.no_grad():
            for _ in range(3):  # autotuning and allocations before the profiled call
                compiled(clips)
            torch.cuda.synchronize(device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                compiled(clips)
                torch.cuda.synchronize(device)
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        device_us = sum(e.device_time_total for e in kernels)
        modelled = (modelled_microseconds(planned, spec.name, "fp16", 0.0) if spec else None)
        families = (compare_kernels(planned, [(e.name, e.device_time_total) for e in kernels], spec, "fp16")
                    if spec else [])
        rows.append({"batch": batch, "planned_launches": len(planned), "measured_kernels": len(kernels),
                     "measured_kernel_us": round(device_us, 1), "per_kernel": families,
                     "modelled_us_without_floor": None if modelled is None else round(modelled, 1),
                     "launch_floor_us_assumed": LAUNCH_FLOOR_US["graph"],
                     "planned": Counter(x.op for x in planned).most_common(),
                     "measured": Counter(e.name for e in kernels).most_common(60)})
        model_text = f", {modelled:.0f} µs modelled" if modelled is not None else ""
        off = [f"{r['family'].removeprefix('stt_fast.')} {r['measured_over_modelled']}x" for r in families
               if r["measured_over_modelled"] is not None and not 0.5 <= r["measured_over_modelled"] <= 2]
        off_text = f"; measured/modelled beyond 2x: {', '.join(off)}" if off else ""
        lines.append(f"batch {batch}: {len(kernels)} kernels measured vs {len(planned)} launches planned, "
                     f"{device_us:.0f} µs of kernel time{model_text}{off_text}")
    write_text_atomic(out / "launch-plan.json", json.dumps({"gpu": props.name, "rows": rows}, indent=1))
    return "; ".join(lines) + " (eager kernels, CUDA graphs off; details in launch-plan.json)"


def item_kernel_bench(device: torch.device, out: Path, config: STTConfig, quick: bool) -> str:
    if device.type != "cuda":
        raise Skip("the Triton kernels are timed on a CUDA GPU only (the interpreter is a correctness tool)")
    from stt_fast.benchmarks import bench_st_attention

    result, path = bench_st_attention.run((1, 8) if quick else (1, 8, 64), "fp16", str(device),
                                          frames=config.num_frames, patches=config.num_patches,
                                          heads=config.num_heads, head_dim=config.head_dim, output_dir=out)
    rows = [r for r in result["rows"] if r["impl"] == "st_attention" and "timing" in r]
    return "; ".join(f"{r['mode']} B={r['batch']}: {r['timing']['median_ms']:.3f} ms, "
                     f"{r.get('speedup_vs_fastest_sdpa', 0):.2f}x the fastest SDPA"
                     + (f", {100 * r['fraction_of_bound']:.0f}% of the roofline bound" if "fraction_of_bound" in r
                        else "") for r in rows) + f" ({path.name})"


def item_bench(device: torch.device, out: Path, config_name: str, quick: bool, progress: bool) -> str:
    from stt_fast.benchmarks.harness import failures, run_suite
    from stt_fast.benchmarks.report import markdown

    if device.type == "cuda":
        name, batches, seconds = config_name, ([1, 8] if quick else [1, 8, 64]), 1.0
    else:  # the paper model on a CPU is `make bench`'s job
        name, batches, seconds = "tiny", ([1] if quick else [1, 8]), (0.05 if quick else 0.2)
    result, path = run_suite(name, batch_sizes=batches, device=str(device), output_dir=out, min_seconds=seconds,
                             progress=progress, purpose="selftest")
    write_text_atomic(out / "bench.md", markdown([result]))
    problems = failures(result)
    if problems:
        raise AssertionError("; ".join(problems))
    ours = [(r["backend"], b) for r in result["results"] if r.get("role") == "ours" for b in r.get("batches", [])
            if "timing" in b]
    best = max(ours, key=lambda rb: rb[1].get("vs_fastest_peer", 0), default=None)
    summary = f"{name} config, batches {batches}: every available backend ran ({path.relative_to(out)})"
    if best:
        summary += (f"; best of ours vs the fastest peer: {best[0]} at batch {best[1]['batch']}, "
                    f"{best[1].get('vs_fastest_peer', 0):.2f}x")
    return summary


def item_tensorrt(device: torch.device, out: Path, config: STTConfig, quick: bool) -> str:
    if device.type != "cuda":
        raise Skip("TensorRT engines are built and run on a CUDA GPU")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise Skip("TensorRT is not installed (pip install 'stt-fast[tensorrt]')") from None
    from .checkpoint import save_checkpoint
    from .export.pipeline import build_from_onnx, check_engine, export_checkpoint

    with tempfile.TemporaryDirectory(prefix="stt_fast-selftest-trt-") as tmp:
        checkpoint = save_checkpoint(_model(config), Path(tmp) / "model.safetensors")
        graphs = export_checkpoint(checkpoint, Path(tmp) / "model.onnx", fp16=True, batch="1:8:64", progress=False,
                                   echo=lambda line: None)
        sidecar = build_from_onnx(graphs[-1].path, out / "model.engine", checkpoint=checkpoint, progress=False,
                                  echo=lambda line: None)
        report = check_engine(out / "model.engine", checkpoint, echo=lambda line: None)
    (out / "model.engine").unlink(missing_ok=True)  # the engine itself is tied to this GPU: keep its sidecar only
    if not report.passed:
        raise AssertionError(f"engine vs reference: {report}")
    return (f"TensorRT {sidecar['tensorrt_version']} FP16 engine built in {sidecar['build_seconds']} s; "
            f"check: {report}")


def item_aot(device: torch.device, out: Path, config_name: str, quick: bool, progress: bool) -> str:
    if device.type != "cuda":
        raise Skip("no local GPU: the CI gate compiles for sm_80, sm_87 and sm_90 instead "
                   "(benchmarks/results/kernels-aot/)")
    major, minor = torch.cuda.get_device_capability(device)
    target = f"sm_{major}{minor}"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "stt_fast", "kernels", "aot", "--targets", target,
                             "--config", config_name, "--output", str(out), "--check", "--quiet"],
                            capture_output=True, text=True, env=env, timeout=3600)
    if "unknown targets" in result.stderr:
        raise Skip(f"{target} is not one of the compile matrix's targets")
    if result.returncode:
        raise AssertionError(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr)
    return f"compile facts for {target}: " + next((line for line in result.stdout.splitlines()
                                                   if line.startswith("Gate:")), "see kernels-aot/")


# --- running them --------------------------------------------------------------------------------------

def run_selftest(output: str | os.PathLike = "results/selftest", *, device: str | None = None,
                 config_name: str = "paper", quick: bool = False, progress: bool = True, seed: int = 0,
                 echo: Callable[[str], None] = print) -> tuple[list[Item], Path]:
    """Run every item, write OUTPUT/<machine>/<time>/ and return (items, the folder). seed draws the kernel
    checks' inputs: a failure replays with the same seed."""
    from stt_fast.benchmarks.machine import machine_header

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {device} was asked for, but this machine has {torch.cuda.device_count()} CUDA "
                         "device(s)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    config = get_config(config_name)
    header = machine_header(device)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = Path(output) / header["slug"] / stamp
    folder.mkdir(parents=True, exist_ok=False)
    plan = [
        ("kernels", lambda: item_kernels(device, folder, config, quick, seed)),
        ("cuda-graphs", lambda: item_cuda_graphs(device, folder, config, quick)),
        ("backends", lambda: item_backends(device, folder, config, quick)),
        ("no-host-sync", lambda: item_no_host_sync(device, folder, config, quick)),
        ("devices", lambda: item_devices(device, folder, config, quick)),
        ("launch-plan", lambda: item_launch_plan(device, folder, config, quick)),
        ("kernel-bench", lambda: item_kernel_bench(device, folder, config, quick)),
        ("bench", lambda: item_bench(device, folder, config_name, quick, progress)),
        ("tensorrt", lambda: item_tensorrt(device, folder, config, quick)),
        ("aot", lambda: item_aot(device, folder, config_name, quick, progress)),
    ]
    items = []
    for name, run in plan:
        item = Item(name)
        echo(f"[selftest] {name} ...")
        started = time.perf_counter()
        try:
            item.detail, item.status = run(), "passed"
        except Skip as e:
            item.detail = str(e)
        except Exception as e:  # a failed item is the finding; the others still run
            item.status, item.detail = "failed", f"{type(e).__name__}: {e}"
            write_text_atomic(folder / f"{name}.traceback.txt", traceback.format_exc())
        item.seconds = round(time.perf_counter() - started, 1)
        echo(f"[selftest] {name}: {item.status} ({item.seconds} s) {item.detail[:300]}")
        items.append(item)
    write_text_atomic(folder / "selftest.json", json.dumps({
        "schema": 1, "created": stamp, "machine": header, "config_name": config_name, "quick": quick, "seed": seed,
        "items": [asdict(i) for i in items],
        "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())}, indent=1, default=str))
    write_text_atomic(folder / "SUMMARY.md", summary(items, header, config_name, stamp, seed))
    return items, folder


def summary(items: list[Item], header: dict, config_name: str, stamp: str, seed: int = 0) -> str:
    gpu = header.get("gpu")
    device = (f"{gpu['name']} (compute capability {gpu['compute_capability']}, {gpu.get('memory_gib')} GiB), "
              f"driver {header.get('driver')}, CUDA {header.get('cuda')}") if gpu else \
        f"{header['cpu']} ({header['cpu_count']} cores; {', '.join(header.get('cpu_isa', []))}), no GPU"
    versions = ", ".join(f"{k} {header[k]}" for k in ("torch", "triton", "onnxruntime", "openvino", "tensorrt")
                         if header.get(k))
    counts = {s: sum(i.status == s for i in items) for s in ("passed", "failed", "skipped")}
    lines = [f"# stt-fast selftest: {header['slug']} ({stamp})", "",
             f"- machine: {device}", f"- software: python {header.get('python')}, {versions}",
             f"- stt_fast {header.get('stt_fast')}, source revision {header.get('source_revision') or 'unknown'}",
             f"- config: {config_name}, seed {seed}",
             f"- result: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped", "",
             "| item | status | seconds | detail |", "|---|---|---:|---|"]
    for item in items:
        detail = item.detail.replace("|", "/").replace("\n", " ")
        lines.append(f"| {item.name} | {item.status.upper() if item.status == 'failed' else item.status} | "
                     f"{item.seconds} | {detail} |")
    lines += ["", "Send this folder back (SUMMARY.md first): it is what a GPU could verify of stt_fast."]
    return "\n".join(lines) + "\n"
