"""Ahead-of-time compiles of every kernel for real GPU targets, on a machine without a GPU.

Triton compiles a kernel all the way to a cubin for any NVIDIA target with the ptxas in its wheel; no
driver is needed. For each kernel (st_attention in each mode, fused_linear in the model's three kinds of
specialisation, cls_attention's three launches, add_layer_norm, max_pool2d, spatial_cls_mean) x launch candidate x dtype
x target, at the model's own specialisation (the arguments the launcher would pass, built by the same
functions it uses), this records what a GPU would otherwise have to tell:

- registers per thread, spill stores and loads, stack frame (ptxas -v);
- shared memory per block, against the target's per-block limit (stt_fast.bounds: a kernel above it
  compiles without complaint and is only dropped at run time, silently, by the autotuner);
- tensor-core instructions in the PTX (wgmma on Hopper, mma.sync before it, none: FMA only) and TF32
  ones (a float32 compile must have none: float32 uses IEEE products), cp.async copies;
- compile time.

What this does not prove: that the kernel is fast, or correct, on the GPU (correctness is tested under
the interpreter against float64 references; speed needs the GPU: `stt-fast selftest`).

`stt-fast kernels aot` writes the matrix (JSON and markdown); `check()` is the CI gate. TRITON_INTERPRET
must not be set in the compiling process (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import re
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from stt_fast.bounds import MAX_REGISTERS_PER_THREAD, SHARED_MEMORY_PER_BLOCK
from stt_fast.config import STTConfig

from .st_attention_configs import CANDIDATES, EXCLUDED, LaunchConfig, fitting

# name -> (capability, a GPU of that architecture)
TARGETS: dict[str, tuple[int, str]] = {
    "sm_75": (75, "T4"), "sm_80": (80, "A100"), "sm_86": (86, "A10"), "sm_87": (87, "Jetson Orin"),
    "sm_89": (89, "L4"), "sm_90": (90, "H100"),
}
GATE_TARGETS = ("sm_80", "sm_87", "sm_90")
NOT_A_TRITON_TARGET = ("below sm_80 Triton emits no tensor-core instruction: stt_fast never runs its Triton kernels "
                       "there (backend='auto' takes the torch path)")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ATTENTION_MODES = ("joint", "spatial", "temporal")


@dataclass(frozen=True)
class Case:
    """One kernel launch to compile: which kernel, which launch configuration, which dtype."""

    kernel: str  # st_attention, spatial_cls_mean, fused_linear, cls_attention, add_layer_norm, max_pool2d
    mode: str  # the attention mode, fused_linear's specialisation (LINEAR_VARIANTS), or ""
    config: tuple  # LaunchConfig; fused_linear: LinearConfig; cls_attention: LaunchConfig(BLOCK_L, BLOCK_D, warps, 1)
    dtype: str

    @property
    def name(self) -> str:
        c = self.config
        if self.kernel == "st_attention":
            tile = f"{c.block_m}x{c.block_n}"
        elif self.kernel == "fused_linear":
            tile = f"{c.block_m}x{c.block_n}x{c.block_k}"
        elif self.kernel == "cls_attention":
            tile = f"L{c.block_m}xD{c.block_n}"
        elif self.kernel == "max_pool2d":
            tile = f"P{c.block_m}xC{c.block_n}"
        elif self.kernel == "spatial_cls_mean":
            tile = f"T{c.block_m}xD{c.block_n}"
        else:
            tile = f"D{c.block_m}"
        return f"{self.kernel}{'-' + self.mode if self.mode else ''} {tile} w{c.num_warps} s{c.num_stages} {self.dtype}"


@dataclass
class Facts:
    case: Case
    target: str
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    shared_limit: int = 0
    tensor_cores: str = "none"  # "wgmma", "mma.sync" or "none"
    wgmma: int = 0
    mma_sync: int = 0
    tf32_instructions: int = 0
    cp_async: int = 0
    compile_seconds: float = 0.0
    error: str | None = None
    excluded: str | None = None  # why the launch table never offers this candidate on this target
    problems: list[str] = field(default_factory=list)

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["case"] = asdict(self.case) | {"name": self.case.name}
        return d


def attention_cases(config: STTConfig, dtypes: Sequence[str]) -> list[Case]:
    """Every candidate the launch tables could offer for the model's group shapes, in each dtype."""
    modes = ("temporal", "spatial") if config.attention == "divided" else ("joint",)
    modes = tuple(dict.fromkeys(modes + ATTENTION_MODES))  # the model's modes first, then the others
    cases = []
    for mode in modes:
        for dtype in dtypes:
            for launch in fitting(mode, config.num_tokens, config.num_frames, config.num_patches, dtype):
                cases.append(Case("st_attention", mode, launch, dtype))
    return cases


def layer_norm_cases(config: STTConfig, dtypes: Sequence[str]) -> list[Case]:
    from .add_layer_norm import launch_shape

    block, warps = launch_shape(config.embed_dim)
    return [Case("add_layer_norm", "", LaunchConfig(block, 0, warps, 1), dtype) for dtype in dtypes]


# fused_linear's specialisations in the model, each at the shape it runs at (the heaviest prologue and
# epilogue of each kind): the LayerNorm prologue with GELU (fc1; qkv and the head differ only in N), the
# residual epilogue that keeps the cls rows (temporal; proj and fc2 without), the token projection.
LINEAR_VARIANTS = ("norm-gelu", "residual-cls", "tokens")


def linear_cases(config: STTConfig, dtypes: Sequence[str]) -> list[Case]:
    from .fused_linear_configs import candidate_table

    return [Case("fused_linear", variant, c, dtype) for variant in LINEAR_VARIANTS for dtype in dtypes
            for c in candidate_table(dtype)]


# cls_attention's three launches (the grid, not the mode, differs between modes): partials first
CLS_LAUNCHES = ("partials", "query", "combine")


def cls_attention_cases(config: STTConfig, dtypes: Sequence[str]) -> list[Case]:
    from .cls_attention import BLOCK_L, launch_shape

    shape = launch_shape(config.embed_dim, config.head_dim, config.num_heads)
    tile = LaunchConfig(BLOCK_L, shape["BLOCK_D"], shape["num_warps"], 1)
    return [Case("cls_attention", launch, tile, dtype) for launch in CLS_LAUNCHES for dtype in dtypes]


def _linear_signature(case: Case, config: STTConfig, dtype: torch.dtype):
    from .fused_linear import _fused_linear_kernel
    from .fused_linear import launch_arguments as linear_arguments
    from .fused_linear_configs import statistics_tile

    dim, length = config.embed_dim, config.num_tokens
    hidden = int(dim * config.mlp_ratio)
    norm = residual = None
    if case.mode == "tokens":
        channels = 4 * config.backbone_width
        a, w, out = torch.empty(length - 1, channels, dtype=dtype), torch.empty(dim, channels, dtype=dtype), None
        bias = torch.empty(length, dim, dtype=dtype)
        out = torch.empty(length, dim, dtype=dtype)
    elif case.mode == "norm-gelu":
        a, w, bias = torch.empty(length, dim, dtype=dtype), torch.empty(hidden, dim, dtype=dtype), torch.empty(
            hidden, dtype=dtype)
        norm, out = torch.empty(dim, dtype=dtype), torch.empty(length, hidden, dtype=dtype)
    else:
        a, w, bias = torch.empty(length, dim, dtype=dtype), torch.empty(dim, dim, dtype=dtype), torch.empty(
            dim, dtype=dtype)
        residual, out = torch.empty(length, dim, dtype=dtype), torch.empty(length, dim, dtype=dtype)
    args, kwargs = linear_arguments(a, w, bias, residual, out, norm, None if norm is None else norm.clone(),
                                    config.layer_norm_eps, gelu=case.mode == "norm-gelu",
                                    cls_period=length if case.mode == "residual-cls" else 0,
                                    tokens=length if case.mode == "tokens" else 0)
    c = case.config
    kwargs |= dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, STATS_K=statistics_tile(c, case.dtype),
                   num_warps=c.num_warps, num_stages=c.num_stages)
    return _fused_linear_kernel, args, kwargs


def _cls_signature(case: Case, config: STTConfig, dtype: torch.dtype):
    from .cls_attention import launch_arguments as cls_arguments

    dim = config.embed_dim
    x = torch.empty(1, config.num_tokens, dim, dtype=dtype)
    vector = torch.empty(dim, dtype=dtype)
    launches = cls_arguments(x, vector, vector.clone(), config.layer_norm_eps, torch.empty(3 * dim, dim, dtype=dtype),
                             torch.empty(3 * dim, dtype=dtype), torch.empty(1, dim, dtype=dtype),
                             num_heads=config.num_heads, num_frames=config.num_frames, mode="spatial")
    kernel, _, args, kwargs = launches[("query", "partials", "combine").index(case.mode)]
    return kernel, args, kwargs


def cls_mean_cases(config: STTConfig, dtypes: Sequence[str]) -> list[Case]:
    from .st_attention import frames_padded

    tile = LaunchConfig(frames_padded(config.num_frames), config.head_dim, 4, 1)
    return [Case("spatial_cls_mean", "", tile, dtype) for dtype in dtypes]


def _cls_mean_signature(config: STTConfig, dtype: torch.dtype):
    from .st_attention import _spatial_cls_mean_kernel, frames_padded

    heads, head_dim = config.num_heads, config.head_dim
    parts = torch.empty(heads, config.num_frames, head_dim, dtype=torch.float32)
    out = torch.empty(1, config.num_tokens, heads, head_dim, dtype=dtype)
    return _spatial_cls_mean_kernel, [parts, out, out.stride(0), out.stride(2), heads, config.num_frames], dict(
        HEAD_DIM=head_dim, T_PAD=frames_padded(config.num_frames))


def max_pool_cases(config: STTConfig, dtypes: Sequence[str]) -> list[Case]:
    from .max_pool import BLOCK_C, BLOCK_P

    return [Case("max_pool2d", "", LaunchConfig(BLOCK_P, BLOCK_C, 4, 1), dtype) for dtype in dtypes]


def _max_pool_signature(config: STTConfig, dtype: torch.dtype):
    from .max_pool import _max_pool2d_kernel

    side = config.image_size // 2  # the stem's output, channels_last, as the program runs it
    x = torch.empty(config.num_frames, config.backbone_width, side, side, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    out = torch.empty(config.num_frames, config.backbone_width, side // 2, side // 2, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    c = max_pool_cases(config, ["fp16"])[0].config
    args = [x, out, x.shape[1], side, side, side // 2, side // 2, out.numel() // x.shape[1], *x.stride(), *out.stride()]
    return _max_pool2d_kernel, args, dict(KERNEL=3, STRIDE=2, PAD=1, WIDE=False, BLOCK_P=c.block_m,
                                          BLOCK_C=c.block_n)


def _launch_signature(case: Case, config: STTConfig):
    """(kernel, positional args, keyword args) exactly as the launcher builds them, on CPU tensors of the
    model's shapes (only strides, dtypes and alignment matter to the compiler)."""
    dtype = DTYPES[case.dtype]
    if case.kernel == "st_attention":
        from .contract import check_attention_inputs
        from .st_attention import _st_attention_kernel, kernel_arguments, tensor_arguments

        qkv = torch.empty(1, config.num_tokens, 3, config.num_heads, config.head_dim, dtype=dtype)
        q, k, v = qkv.unbind(2)
        out = torch.empty(q.shape, dtype=dtype)
        shape = check_attention_inputs(q, k, v, num_frames=config.num_frames, mode=case.mode)
        kwargs = kernel_arguments(shape, case.mode, dtype, config.head_dim**-0.5, interpreted=False)
        c = case.config
        kwargs |= dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages)
        return _st_attention_kernel, tensor_arguments(q, k, v, out), kwargs
    if case.kernel == "fused_linear":
        return _linear_signature(case, config, dtype)
    if case.kernel == "cls_attention":
        return _cls_signature(case, config, dtype)
    if case.kernel == "max_pool2d":
        return _max_pool_signature(config, dtype)
    if case.kernel == "spatial_cls_mean":
        return _cls_mean_signature(config, dtype)
    from .add_layer_norm import _add_layer_norm_kernel, launch_arguments

    rows = torch.empty(config.num_tokens, config.embed_dim, dtype=dtype)
    weight = torch.empty(config.embed_dim, dtype=dtype)
    args, kwargs = launch_arguments(rows, rows.clone(), weight, weight.clone(), rows.clone(), rows.clone(),
                                    config.layer_norm_eps, config.num_tokens, has_delta=True)
    return _add_layer_norm_kernel, args, kwargs


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def compile_kernel(case: Case, target: str, config: STTConfig):
    """Triton's compiled kernel of one case for one target (its .asm holds "ttir", "ptx", "cubin")."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel, args, kwargs = _launch_signature(case, config)
    if not hasattr(kernel, "_pack_args"):
        raise RuntimeError("ahead-of-time compiles need the real Triton JIT: unset TRITON_INTERPRET")
    gpu = GPUTarget("cuda", TARGETS[target][0], 32)
    backend = make_backend(gpu)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=gpu, options=options.__dict__)


def compile_case(case: Case, target: str, config: STTConfig) -> Facts:
    """Compile one case for one target and read its facts; a failed compile is a fact too (error)."""
    import triton
    import triton.knobs

    capability = TARGETS[target][0]
    facts = Facts(case, target, shared_limit=SHARED_MEMORY_PER_BLOCK[f"{capability // 10}.{capability % 10}"])
    if case.kernel == "fused_linear":
        from .fused_linear_configs import EXCLUDED as LINEAR_EXCLUDED

        excluded = LINEAR_EXCLUDED.get((capability // 10, capability % 10), {}).get(case.dtype, {})
    else:
        excluded = EXCLUDED.get((capability // 10, capability % 10), {}).get(case.mode, {})
    facts.excluded = NOT_A_TRITON_TARGET if capability < 80 else excluded.get(case.config)
    kernel = _launch_signature(case, config)[0]
    log = io.StringIO()
    started = time.perf_counter()
    triton.knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = compile_kernel(case, target, config)
    except Exception as e:  # a candidate that does not compile for this target is a fact to record
        facts.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        return facts
    finally:
        triton.knobs.nvidia.dump_ptxas_log = False
    facts.compile_seconds = round(time.perf_counter() - started, 2)
    text = log.getvalue()
    entry = text[text.find("Function properties for " + kernel.fn.__name__):] or text
    for name, pattern in _PTXAS.items():
        match = pattern.search(entry)
        setattr(facts, name, int(match.group(1)) if match else None)
    facts.shared_bytes = int(compiled.metadata.shared)
    ptx = compiled.asm["ptx"]
    facts.wgmma = len(re.findall(r"\bwgmma\.mma_async", ptx))
    facts.mma_sync = len(re.findall(r"\bmma\.sync", ptx))
    facts.tf32_instructions = len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\S*\.tf32", ptx))
    facts.cp_async = len(re.findall(r"\bcp\.async", ptx))
    facts.tensor_cores = "wgmma" if facts.wgmma else "mma.sync" if facts.mma_sync else "none"
    return facts


@contextlib.contextmanager
def _environment(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _compile_one(job) -> Facts:
    case, target, config_json = job
    return compile_case(case, target, STTConfig.from_json(config_json))


def run(config: STTConfig, targets: Sequence[str] = tuple(TARGETS), dtypes: Sequence[str] = ("fp16", "bf16", "fp32"),
        *, workers: int | None = None, progress: bool = True) -> list[Facts]:
    """Compile every case for every target (in worker processes) and return the facts, gate problems
    attached (see check())."""
    from stt_fast.progress import progress_bar

    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise ValueError("ahead-of-time compiles need the real Triton compiler: unset TRITON_INTERPRET")
    cases = (attention_cases(config, dtypes) + linear_cases(config, dtypes) + cls_attention_cases(config, dtypes)
             + layer_norm_cases(config, dtypes) + max_pool_cases(config, dtypes) + cls_mean_cases(config, dtypes))
    jobs = [(case, target, config.to_json()) for target in targets for case in cases]
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    # A fresh Triton cache: a cached kernel is not compiled again, and then ptxas reports nothing.
    with tempfile.TemporaryDirectory(prefix="stt_fast-aot-cache-") as cache, _environment(TRITON_CACHE_DIR=cache), \
            ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        facts = list(progress_bar(pool.map(_compile_one, jobs), desc="[kernels aot] compiles", total=len(jobs),
                                  enabled=progress, unit="compile"))
    for f in facts:
        f.problems = problems(f)
    return facts


def main_configs(mode: str) -> list[LaunchConfig]:
    """The candidates of a mode that must reach Hopper's wgmma: the 64-row and larger tiles of 4+ warps."""
    return [c for c in CANDIDATES[mode] if c.block_m >= 64 and c.num_warps >= 4]


def problems(f: Facts) -> list[str]:
    """Why a compile fails the gate: only candidates the launch table can choose on the target count."""
    if f.excluded:
        return []
    found = []
    if f.error:
        return [f"does not compile: {f.error}"]
    if f.registers is None:
        return ["ptxas reported nothing (a cached compile?)"]
    if f.spills:
        found.append(f"spills {f.spill_stores} B stores / {f.spill_loads} B loads")
    if f.shared_bytes is not None and f.shared_bytes > f.shared_limit:
        found.append(f"needs {f.shared_bytes} B of shared memory, the target gives a block {f.shared_limit} B")
    if f.registers is not None and f.registers > MAX_REGISTERS_PER_THREAD:
        found.append(f"uses {f.registers} registers")
    if f.case.dtype == "fp32" and f.tf32_instructions:
        found.append(f"float32 compiled to {f.tf32_instructions} TF32 instructions (must be IEEE)")
    if (f.target == "sm_90" and f.case.kernel == "st_attention" and f.case.mode in ("joint", "spatial")
            and f.case.dtype != "fp32" and f.case.config in main_configs(f.case.mode) and not f.wgmma):
        found.append("no wgmma on sm_90 for a main configuration")
    if (f.target == "sm_90" and f.case.kernel == "fused_linear" and f.case.dtype != "fp32"
            and f.case.config.block_m >= 64 and not f.wgmma):
        found.append("no wgmma on sm_90 for a 64-row or larger tile")
    return found


def check(facts: Sequence[Facts]) -> list[str]:
    """The gate: every problem of every candidate the launch tables can choose."""
    return [f"{f.target} {f.case.name}: {p}" for f in facts for p in problems(f)]


def markdown(facts: Sequence[Facts], *, triton_version: str, config_name: str) -> str:
    """The matrix: one row per case, the targets side by side."""
    targets = list(dict.fromkeys(f.target for f in facts))
    by_case: dict[Case, dict[str, Facts]] = {}
    for f in facts:
        by_case.setdefault(f.case, {})[f.target] = f
    lines = [
        f"Ahead-of-time compiles of every kernel x launch candidate x dtype at the `{config_name}` "
        f"specialisation, Triton {triton_version}, on a CPU-only machine (no GPU, no driver). Each cell: "
        "registers / spilled bytes / shared memory (KiB) / tensor-core instructions. **bold**: a problem "
        "(spills, shared memory above the target's per-block limit, TF32 in a float32 compile, no wgmma on "
        "sm_90 for a main tile); *excluded*: the per-architecture launch table never offers it there "
        "(kernels/st_attention_configs.py). These are compile facts, not speed: nothing here ran on a GPU.",
        "",
        "| kernel, tile, warps, stages, dtype | " + " | ".join(
            f"{t} ({TARGETS[t][1]}, {SHARED_MEMORY_PER_BLOCK[f'{TARGETS[t][0] // 10}.{TARGETS[t][0] % 10}'] // 1024} "
            "KiB)" for t in targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for case, row in by_case.items():
        cells = []
        for t in targets:
            f = row.get(t)
            if f is None:
                cells.append("")
                continue
            if f.error:
                cell = f"fails: {f.error[:60]}"
            else:
                spill = (f.spill_stores or 0) + (f.spill_loads or 0)
                cell = f"{f.registers} / {spill} / {f.shared_bytes / 1024:.0f} / {f.tensor_cores}"
            if f.excluded:
                cell = f"*excluded: {cell}*"
            elif f.problems:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {case.name} | " + " | ".join(cells) + " |")
    gate = check(facts)
    lines += ["", f"Gate: {'passed' if not gate else 'FAILED'} ({len(facts)} compiles, "
                  f"{sum(f.compile_seconds for f in facts):.0f} s of compile time)."]
    lines += [f"- {p}" for p in gate]
    return "\n".join(lines)
