"""The launch plan: the device work of one steady-state forward as a GPU would run it, without a GPU.

A forward is traced on fake CUDA tensors (FakeTensorMode: shapes, dtypes and strides, no data, no GPU) under
a dispatch mode that records every operator that reaches the device. Each recorded operator that computes
(not a view, not an allocation, not a metadata query) is one launch; a custom kernel (stt_fast::st_attention,
stt_fast::fused_linear, stt_fast::max_pool2d, stt_fast::add_layer_norm, stt_fast::conv_bias_relu: cuDNN's
fused convolution-bias-ReLU) is one launch, and so is a matrix product with its cuBLASLt epilogue
(aten._addmm_activation); a plain convolution with a bias is two, as PyTorch runs it on cuDNN (cuDNN's
convolution, then the bias added by a separate kernel). Per launch: FLOPs (torch.utils.flop_counter's
formulas; the custom kernels' from their products and stt_fast.bounds), bytes read (every tensor operand
once) and written (every output once). cls_attention is three launches (query, partials, combine), each
with its own work, and spatial st_attention two (the attention, then the mean of the frames' shares of the
cls row).

Occupancy: each of stt_fast's Triton launches also carries its grid (programs) and its serial chain (the
longest run of dependent memory reads in one program, from each kernel's planned_grid / planned_launches,
beside the kernel). Per GPU type of stt_fast.bounds, a launch takes the per-launch floor plus the longest of

    compute   FLOPs / (peak * busy)                   busy: programs / (waves * SMs), waves = ceil(programs / SMs)
    memory    bytes / (bandwidth * min(1, SM_BANDWIDTH_SHARE * busy))
    latency   MEMORY_LATENCY_US * max(longest chain, chains summed / (RESIDENT_PROGRAMS_PER_SM * SMs))

so 8 programs on 132 SMs get 6% of the compute and a quarter of the bandwidth, a program that waits on 64
reads in a row takes 64 round trips whatever its FLOPs, and thousands of programs that each wait on 17 keep
every SM waiting. Library launches (cuBLAS, cuDNN, PyTorch's elementwise kernels) are taken to fill the GPU
(roofline only). The launch tables' first candidate is assumed where the autotuner chooses, for an H100
(PLAN_CAPABILITY, PLAN_SMS).

THIS IS A MODEL, NOT A MEASUREMENT. The floor, the latency, the bandwidth one SM can draw and the programs
that overlap on an SM are assumptions (the constants below), caches are ignored (bytes are DRAM traffic as if
nothing stayed in L2), and kernels never overlap. What it is for: counting launches and
bytes, the two things that decide this model's time at small batch, and seeing where they go. `stt-fast
selftest` on a GPU records torch.profiler's kernel list beside it, so the model is checked the first time a
GPU runs it. It cannot model torch.compile or TensorRT, which fuse what they see.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .bounds import GPUSpec, attention_work, gpu_spec, roofline
from .config import STTConfig, get_config

# Assumed device time a launch costs beyond its roofline time: a kernel replayed in a CUDA graph (the
# compiled module) and one launched by eager PyTorch (the reference), which adds the framework's per-op
# host overhead whenever the GPU outruns it. Assumptions of this model, to be replaced by what the
# selftest's torch.profiler run measures.
LAUNCH_FLOOR_US = {"graph": 2.0, "eager": 5.0}
# A global-memory read that nothing overlaps (L2 hit to DRAM miss: 0.3-0.7 µs on A100/H100), the share of the
# GPU's bandwidth one busy SM can draw (x its even share), and the programs an SM runs at once, overlapping
# their waits. Assumptions, to be checked against the selftest's kernel times.
MEMORY_LATENCY_US = 0.5
SM_BANDWIDTH_SHARE = 4.0
RESIDENT_PROGRAMS_PER_SM = 4  # a 64 x 64 x 64 fp16 GEMM program: 48 KiB of shared memory, four fit 228 KiB
# The target whose launch tables and SM count decide the grids of the traced launches.
PLAN_CAPABILITY = (9, 0)
PLAN_SMS = 132
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_GPUS = ("H100 SXM", "A100 SXM4 80GB", "L4", "Jetson AGX Orin 64GB")
# Operators that reach the dispatcher but launch nothing: allocations and metadata.
NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "detach",
             "_unsafe_view",  # a reshape of a contiguous result: metadata only
             "set_", "resize_"}


@dataclass(frozen=True)
class Launch:
    op: str  # the operator, e.g. "aten.addmm" or "stt_fast.st_attention"
    kind: str  # gemm, conv, attention, layer_norm, elementwise, reduction, copy, other
    flops: int
    bytes_read: int
    bytes_written: int
    shape: str  # the first output's shape
    programs: int | None = None  # the grid of one of stt_fast's Triton launches; None: a library kernel
    serial: int = 0  # the longest chain of dependent memory reads in one program
    serial_total: int = 0  # those chains summed over the programs

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


_KINDS = {"addmm": "gemm", "_addmm_activation": "gemm", "mm": "gemm", "bmm": "gemm", "baddbmm": "gemm",
          "linear": "gemm", "fused_linear": "gemm", "convolution": "conv", "conv_bias_relu": "conv",
          "st_attention": "attention", "cls_attention": "attention", "add_layer_norm": "layer_norm",
          "native_layer_norm": "layer_norm", "_softmax": "reduction", "sum": "reduction", "mean": "reduction",
          "amax": "reduction", "max_pool2d_with_indices": "reduction", "max_pool2d": "reduction", "_to_copy": "copy",
          "copy_": "copy", "clone": "copy", "cat": "copy"}


def _tensors(values) -> list[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten(values)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Recorder(TorchDispatchMode):
    """Every launch of the operators dispatched below it (outermost calls only)."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[Launch] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.name().split("::")[-1].split(".")[0]
        namespace = func.namespace
        outputs = _tensors(out)
        if (namespace not in ("aten", "stt_fast") or not outputs or name in NO_LAUNCH
                or getattr(func, "is_view", False)):
            return out
        inputs = _tensors((args, kwargs))
        if name in ("copy_", "add_", "relu_", "mul_", "div_", "masked_fill_"):  # in place: the output is an input
            outputs = outputs[:1]
        flops = self._flops(func, name, args, kwargs, out)
        same_size = bool(inputs) and outputs[0].numel() == inputs[0].numel()
        kind = _KINDS.get(name, "elementwise" if same_size else "other")
        shape = "x".join(map(str, outputs[0].shape))
        if name == "convolution" and len(args) > 2 and args[2] is not None:
            # PyTorch's cuDNN path: the convolution without its bias, then the bias added by its own kernel
            conv_out = _nbytes(outputs)
            self.launches.append(Launch("aten.convolution", "conv", flops, _nbytes(inputs[:2]), conv_out, shape))
            self.launches.append(Launch("aten.add_ (conv bias)", "elementwise", outputs[0].numel(),
                                        conv_out + _nbytes(inputs[2:3]), conv_out, shape))
            return out
        if name == "cls_attention":
            self.launches += _cls_attention_launches(args, shape)
            return out
        programs, serial, serial_total = _grid(name, args, kwargs)
        self.launches.append(Launch(f"{namespace}.{name}", kind, flops, _nbytes(inputs), _nbytes(outputs), shape,
                                    programs, serial, serial_total))
        if name == "st_attention" and args[4] == "spatial":
            self.launches.append(_spatial_cls_mean(args[0], args[3]))
        return out

    @staticmethod
    def _flops(func, name: str, args, kwargs, out) -> int:
        if name == "st_attention":
            q, _, _, frames, mode = args[:5]
            batch, length, heads, head_dim = q.shape
            patches = (length - 1) // frames
            return attention_work(mode, batch, frames, patches, heads, head_dim, q.element_size())[0]
        if name == "fused_linear":  # the product's FLOPs (the prologue and epilogue are not counted)
            a, weight = args[:2]
            return 2 * (a.numel() // a.shape[-1]) * weight.shape[0] * weight.shape[1]
        if name == "_addmm_activation":  # a matrix product with its epilogue: the product's FLOPs
            return int(flop_registry[torch.ops.aten.addmm](*args[:3], out_val=out))
        if name == "conv_bias_relu":  # a convolution's FLOPs (the bias, add and ReLU are not counted)
            x, weight, bias, stride, padding = args[:5]
            counter = flop_registry[torch.ops.aten.convolution]
            return int(counter(x, weight, bias, stride, padding, [1, 1], False, [0, 0], 1, out_val=out))
        counter = flop_registry.get(func._overloadpacket)
        return int(counter(*args, **kwargs, out_val=out)) if counter else 0


def _dtype_name(t: torch.Tensor) -> str:
    """The precision's name of a tensor's dtype, as the launch tables know it."""
    return {dtype: name for name, dtype in PRECISIONS.items()}[t.dtype]


def _grid(name: str, args, kwargs) -> tuple[int | None, int, int]:
    """(programs, longest chain, chains summed) of one of stt_fast's Triton launches (None, 0, 0 for any other)."""
    if name == "st_attention":
        from .kernels.st_attention import planned_grid

        q, _, _, frames, mode = args[:5]
        batch, length, heads, _ = q.shape
        return planned_grid(mode, batch, heads, length, frames, (length - 1) // frames, _dtype_name(q),
                            PLAN_CAPABILITY)
    if name == "fused_linear":
        from .kernels.fused_linear import planned_grid

        a, weight, norm_weight = args[0], args[1], args[3]
        rows = a.numel() // a.shape[-1]
        tokens = args[9] if len(args) > 9 else kwargs.get("tokens", 0)
        rows = rows // (tokens - 1) * tokens if tokens else rows
        return planned_grid(rows, weight.shape[0], weight.shape[1], norm_weight is not None, _dtype_name(a),
                            PLAN_CAPABILITY)
    if name == "max_pool2d":
        from .kernels.max_pool import output_size, planned_grid

        x, kernel, stride, padding = args[:4]
        frames, channels, height, width = x.shape
        return planned_grid(frames, channels, *(output_size(s, kernel, stride, padding) for s in (height, width)))
    if name == "add_layer_norm":
        rows = args[0].numel() // args[0].shape[-1]
        return rows, 1, rows
    return None, 0, 0


def _spatial_cls_mean(q: torch.Tensor, frames: int) -> Launch:
    from .kernels.st_attention import spatial_cls_mean_launch

    batch, _, heads, head_dim = q.shape
    p = spatial_cls_mean_launch(batch, heads, frames, head_dim, q.element_size())
    return Launch("stt_fast.spatial_cls_mean", "attention", p["flops"], p["bytes_read"], p["bytes_written"],
                  f"{batch}x{heads}x{head_dim}", p["programs"], p["serial"], p["programs"] * p["serial"])


def _cls_attention_launches(args, shape: str) -> list[Launch]:
    from .kernels.cls_attention import PROGRAMS_PER_SM, planned_launches

    x, heads, frames, mode = args[0], args[6], args[7], args[8]
    batch, length, dim = x.shape
    return [Launch(f"stt_fast.{p['name']}", "attention", p["flops"], p["bytes_read"], p["bytes_written"], shape,
                   p["programs"], p["serial"], p["programs"] * p["serial"])
            for p in planned_launches(batch, length, dim, heads, frames, mode, x.element_size(),
                                      PLAN_SMS * PROGRAMS_PER_SM)]


def trace_launches(run: Callable[[], object], mode: FakeTensorMode) -> list[Launch]:
    """The launches of run() (a forward on fake CUDA tensors made under `mode`)."""
    recorder = _Recorder()
    with mode, recorder, torch.no_grad():
        run()
    return recorder.launches


def fake_cuda(module: torch.nn.Module, dtype: torch.dtype, mode: FakeTensorMode) -> torch.nn.Module:
    """module with its tensors replaced by fake CUDA tensors of `mode` (floating ones in dtype): the CUDA
    path without a GPU."""
    def to_fake_cuda(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(t.shape, t.stride(), device="cuda",
                                   dtype=dtype if t.is_floating_point() else t.dtype)

    with mode:
        module._apply(to_fake_cuda)
    return module


def fake_cuda_module(model, ops: str, dtype: torch.dtype, mode: FakeTensorMode):
    """A CompiledSTT of model's program with op set `ops` ("triton" or "torch") on fake CUDA tensors of
    `mode`, without CUDA graphs (capturing one needs a real GPU)."""
    from .compiler import CompiledSTT
    from .compiler.program import STTProgram

    program = fake_cuda(STTProgram(model, ops=ops).eval(), dtype, mode)
    return CompiledSTT(program, config=model.config, device=torch.device("cuda", 0), dtype=dtype, backend=ops)


def forward_launches(config: STTConfig, *, backend: str, batch: int, dtype: torch.dtype) -> list[Launch]:
    """The launches of one forward on `batch` uint8 clips already on the GPU: backend "triton" or "torch" (the
    compiled program's op sets) or "reference" (the eager reference model on CUDA, the peer)."""
    from .model import STT

    torch.manual_seed(0)
    with torch.device("meta"):  # no weights are computed: only their shapes reach the fake tensors
        model = STT(config).eval()
    mode = FakeTensorMode()
    if backend == "reference":
        # on the meta device: a CPU-only PyTorch cannot index fake CUDA tensors (the reference does), and the
        # reference has no device-dependent code, so the same operators reach the device
        model = model.to(dtype)
        clips = torch.empty(batch, config.num_frames, 3, config.image_size, config.image_size, device="meta",
                            dtype=torch.uint8)
        recorder = _Recorder()
        with recorder, torch.no_grad():
            model(clips)
        return recorder.launches
    if backend in ("triton", "torch"):
        module = fake_cuda_module(model.to_empty(device="cpu"), backend, dtype, mode)
    else:
        raise ValueError(f"backend must be 'triton', 'torch' or 'reference', got {backend!r}")
    with mode:
        clips = torch.empty(batch, config.num_frames, 3, config.image_size, config.image_size, device="cuda",
                            dtype=torch.uint8)
    return trace_launches(lambda: module(clips), mode)


@dataclass(frozen=True)
class PlanRow:
    """One forward's totals for one (backend, batch), and its modelled time per GPU type (µs)."""

    backend: str
    batch: int
    launches: int
    flops: int
    bytes: int
    by_kind: dict[str, int]
    modelled_us: dict[str, float]


def launch_microseconds(launch: Launch, spec: GPUSpec, precision: str, floor_us: float) -> float:
    """One launch's modelled time: the floor plus the longest of its compute, memory and latency terms, with
    the share of the GPU its programs occupy (module docstring). A launch without a grid fills the GPU."""
    if launch.programs is None:
        return roofline(spec, launch.flops, launch.bytes, precision).microseconds + floor_us
    programs = max(1, launch.programs)
    waves = math.ceil(programs / spec.sms)
    busy = programs / (waves * spec.sms)
    compute = launch.flops / (spec.tflops(precision) * 1e12 * busy) * 1e6
    memory = launch.bytes / (spec.memory_gbps * 1e9 * min(1.0, SM_BANDWIDTH_SHARE * busy)) * 1e6
    latency = MEMORY_LATENCY_US * max(launch.serial, launch.serial_total / (RESIDENT_PROGRAMS_PER_SM * spec.sms))
    return floor_us + max(compute, memory, latency)


def modelled_microseconds(launches: Sequence[Launch], gpu: str, precision: str, floor_us: float) -> float:
    """The plan's time on a GPU of stt_fast.bounds: each launch's modelled time (launch_microseconds), summed."""
    spec = gpu_spec(gpu)
    if spec is None:
        raise ValueError(f"no datasheet entry for GPU {gpu!r} in stt_fast.bounds")
    return sum(launch_microseconds(launch, spec, precision, floor_us) for launch in launches)


def plan_row(launches: Sequence[Launch], backend: str, batch: int, precision: str, gpus: Sequence[str]) -> PlanRow:
    """One forward's totals (launches: forward_launches') and its modelled time per GPU type."""
    floor = LAUNCH_FLOOR_US["eager" if backend == "reference" else "graph"]
    return PlanRow(backend, batch, len(launches), sum(x.flops for x in launches), sum(x.bytes for x in launches),
                   dict(Counter(x.kind for x in launches)),
                   {gpu: round(modelled_microseconds(launches, gpu, precision, floor), 1) for gpu in gpus})


def launch_plan(config_name: str = "paper", *, backends: Sequence[str] = ("triton", "torch"),
                batches: Sequence[int] = (1, 8, 64), precision: str = "fp16",
                gpus: Sequence[str] = DEFAULT_GPUS) -> dict:
    """The plan of config_name for each backend and batch, with the eager reference beside it, and every
    launch of the first backend's first batch on the first GPU type: plain data (JSON-able), labelled as a
    model."""
    config = get_config(config_name)
    traced = {(backend, batch): forward_launches(config, backend=backend, batch=batch, dtype=PRECISIONS[precision])
              for backend in (*backends, "reference") for batch in batches}
    rows = [plan_row(launches, backend, batch, precision, gpus) for (backend, batch), launches in traced.items()]
    first = (backends[0], batches[0])
    return {"kind": "launch plan (a model, not a measurement)", "config_name": config_name,
            "config": config.to_dict(), "precision": precision, "clips": "uint8, already on the GPU",
            "launch_floor_us": LAUNCH_FLOOR_US,
            "occupancy": {"memory_latency_us": MEMORY_LATENCY_US, "sm_bandwidth_share": SM_BANDWIDTH_SHARE,
                          "resident_programs_per_sm": RESIDENT_PROGRAMS_PER_SM},
            "gpus": list(gpus),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "rows": [asdict(r) for r in rows],
            "launches": {"-".join(map(str, first)): launch_table(traced[first], first[0], precision, gpus[0])}}


def launch_table(launches: Sequence[Launch], backend: str, precision: str, gpu: str) -> list[dict]:
    """Every launch of one forward with its grid, serial chain and modelled time on one GPU type."""
    spec = gpu_spec(gpu)
    floor = LAUNCH_FLOOR_US["eager" if backend == "reference" else "graph"]
    return [asdict(x) | {"gpu": gpu, "modelled_us": round(launch_microseconds(x, spec, precision, floor), 2)}
            for x in launches]


def kernel_family(name: str) -> str:
    """The plan's op for a kernel name as torch.profiler reports it: stt_fast's Triton kernels by their
    function (_cls_partials_kernel -> stt_fast.cls_partials, _st_attention_kernel -> stt_fast.st_attention);
    everything else (cuDNN, cuBLAS, PyTorch's own kernels) -> "library"."""
    match = re.fullmatch(r"_([a-z0-9_]+)_kernel", name.split("(")[0].strip())
    return f"stt_fast.{match.group(1)}" if match else "library"


def compare_kernels(planned: Sequence[Launch], measured: Sequence[tuple[str, float]], spec: GPUSpec,
                    precision: str) -> list[dict]:
    """Per family (kernel_family; the plan's launches without a grid count as "library"): launches planned and
    kernels measured, the plan's modelled µs (no floor: a profiler's kernel time has no launch gap) against
    the measured device µs, and their ratio. measured: (kernel name, device µs) per kernel."""
    rows: dict[str, dict] = {}
    for launch in planned:
        family = launch.op if launch.programs is not None else "library"
        row = rows.setdefault(family, dict(family=family, planned=0, measured=0, modelled_us=0.0, measured_us=0.0))
        row["planned"] += 1
        row["modelled_us"] += launch_microseconds(launch, spec, precision, 0.0)
    for name, microseconds in measured:
        family = kernel_family(name)
        row = rows.setdefault(family, dict(family=family, planned=0, measured=0, modelled_us=0.0, measured_us=0.0))
        row["measured"] += 1
        row["measured_us"] += microseconds
    for row in rows.values():
        row["modelled_us"] = round(row["modelled_us"], 1)
        row["measured_us"] = round(row["measured_us"], 1)
        ratio = row["measured_us"] / row["modelled_us"] if row["modelled_us"] else None
        row["measured_over_modelled"] = None if ratio is None else round(ratio, 2)
    return sorted(rows.values(), key=lambda r: -r["measured_us"])


def plan_markdown(plan: dict) -> str:
    """The plan as markdown: per backend and batch, launches, bytes and modelled time per GPU type."""
    gpus = plan["gpus"]
    lines = [f"### Launch plan: `{plan['config_name']}`, {plan['precision']}, {plan['clips']}",
             "",
             "**A model, not a measurement**: each launch's time on the GPU's datasheet peaks, for the share of the "
             "SMs its grid occupies and the chain of dependent reads in its programs, plus a "
             f"per-launch floor ({plan['launch_floor_us']['graph']} µs in a CUDA graph for ours, "
             f"{plan['launch_floor_us']['eager']} µs eager for the reference: assumptions), no cache, no overlap "
             "(stt_fast/launch_plan.py states the model and its assumed constants). "
             "It counts launches and bytes; it cannot model torch.compile or TensorRT. `stt-fast selftest` "
             "records torch.profiler's kernel list beside it on a GPU.",
             "",
             "| backend | batch | launches | GB moved | GFLOP | by kind | "
             + " | ".join(f"{g} (µs)" for g in gpus) + " |",
             "|---|---:|---:|---:|---:|---|" + "---:|" * len(gpus)]
    for r in plan["rows"]:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["by_kind"].items(), key=lambda kv: -kv[1]))
        times = " | ".join(f"{r['modelled_us'][g]:.0f}" for g in gpus)
        lines.append(f"| {r['backend']} | {r['batch']} | {r['launches']} | {r['bytes'] / 1e9:.3f} | "
                     f"{r['flops'] / 1e9:.2f} | {kinds} | {times} |")
    for name, table in plan.get("launches", {}).items():
        total = sum(x["modelled_us"] for x in table)
        lines += ["", f"#### Every launch of `{name}` on {table[0]['gpu']}: {total:.0f} µs modelled", "",
                  "| # | launch | output | programs | longest chain | MB | MFLOP | µs |",
                  "|---:|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {i} | {x['op']} | {x['shape']} | {x['programs'] if x['programs'] is not None else 'library'} | "
                  f"{x['serial']} | {(x['bytes_read'] + x['bytes_written']) / 1e6:.2f} | {x['flops'] / 1e6:.1f} | "
                  f"{x['modelled_us']:.1f} |" for i, x in enumerate(table, 1)]
    return "\n".join(lines) + "\n"


def write_plan(plan: dict, output: str | os.PathLike) -> tuple[Path, Path]:
    """OUTPUT/launch-plan/<time>-<config>.json and .md, written atomically."""
    from .files import write_text_atomic

    stamp = plan["created"].replace("-", "").replace(":", "").replace("+0000", "Z")  # 20261201T211418Z
    base = Path(output) / "launch-plan" / f"{stamp}-{plan['config_name']}"
    return (write_text_atomic(base.with_suffix(".json"), json.dumps(plan, indent=1)),
            write_text_atomic(base.with_suffix(".md"), plan_markdown(plan)))
