"""Physical lower bounds on the time of STT's work on each GPU type: the roofline from datasheet peaks.

A bound is max(FLOPs / peak arithmetic rate, bytes / peak memory bandwidth) for a piece of work whose
FLOPs and minimum bytes moved follow from its shapes. It is a floor no implementation can beat on that
GPU, not a prediction and never a measurement: reports label it so. Measurements (the benchmark suite,
the kernel microbenchmark) are stated as fractions of it.

Minimum bytes: each operand read once and each result written once (weights, inputs, outputs); what a
real implementation re-reads, or spills between kernels, comes on top.

Peaks: dense (no 2:4 sparsity) tensor-core rates for fp16/bf16, CUDA-core rates for fp32 (no TF32: the
fp32 paths here use IEEE products), and peak DRAM bandwidth, from NVIDIA's datasheets. Jetson Orin
modules publish INT8 sparse TOPS rather than fp16: their fp16 rate is derived (INT8 sparse / 4: the
same tensor cores do half as many fp16 as INT8 operations, and sparsity doubles the published figure)
and checked against tensor cores x clock x 256 fp16 multiply-adds per clock (Ampere).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import STTConfig

PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class GPUSpec:
    name: str
    pattern: str  # a regular expression matching torch.cuda.get_device_properties().name
    capability: str
    fp16_tflops: float  # dense tensor core, fp16 (and bf16 where supported)
    fp32_tflops: float  # CUDA cores, no TF32
    memory_gbps: float
    bf16: bool
    source: str
    min_memory_gib: float = 0.0  # Jetson modules share the name "Orin": memory tells them apart
    max_memory_gib: float = 1e9
    sms: int = 0  # streaming multiprocessors (the same datasheets; Jetson: CUDA cores / 128)

    def tflops(self, precision: str) -> float:
        if precision == "fp32":
            return self.fp32_tflops
        if precision == "bf16" and not self.bf16:
            raise ValueError(f"{self.name} has no bfloat16 tensor cores")
        return self.fp16_tflops


GPUS: tuple[GPUSpec, ...] = (
    GPUSpec("T4", r"\bT4\b", "7.5", 65.0, 8.1, 320, False, "NVIDIA T4 datasheet (65 TFLOPS mixed precision)",
            sms=40),
    GPUSpec("L4", r"\bL4\b", "8.9", 121.0, 30.3, 300, True, "NVIDIA L4 datasheet (242 TFLOPS fp16 with sparsity)",
            sms=58),
    GPUSpec("A10", r"\bA10\b", "8.6", 125.0, 31.2, 600, True, "NVIDIA A10 datasheet (250 TFLOPS fp16 with sparsity)",
            sms=72),
    GPUSpec("A100 SXM4 80GB", r"A100.*80GB", "8.0", 312.0, 19.5, 2039, True,
            "NVIDIA A100 datasheet", sms=108),
    GPUSpec("A100 40GB", r"A100", "8.0", 312.0, 19.5, 1555, True, "NVIDIA A100 datasheet (40GB PCIe)", sms=108),
    GPUSpec("H100 SXM", r"H100.*(HBM3|SXM)", "9.0", 989.0, 67.0, 3350, True,
            "NVIDIA H100 datasheet (1979 TFLOPS fp16 with sparsity)", sms=132),
    GPUSpec("H100 PCIe", r"H100.*PCIe", "9.0", 756.0, 51.0, 2000, True, "NVIDIA H100 datasheet", sms=114),
    GPUSpec("H200", r"H200", "9.0", 989.0, 67.0, 4800, True, "NVIDIA H200 datasheet", sms=132),
    GPUSpec("Jetson AGX Orin 64GB", r"Orin", "8.7", 42.5, 5.3, 204.8, True,
            "Jetson AGX Orin technical brief: GPU 170 INT8 sparse TOPS (fp16 derived: / 4; 64 tensor cores x "
            "1.3 GHz x 512), 5.3 FP32 TFLOPS, 204.8 GB/s", min_memory_gib=40, sms=16),
    GPUSpec("Jetson AGX Orin 32GB", r"Orin", "8.7", 26.7, 3.3, 204.8, True,
            "Jetson AGX Orin data sheet: 56 tensor cores x 0.93 GHz x 512 (derived), 204.8 GB/s",
            min_memory_gib=24, max_memory_gib=40, sms=14),
    GPUSpec("Jetson Orin NX 16GB", r"Orin", "8.7", 15.0, 1.9, 102.4, True,
            "Jetson Orin NX data sheet: 32 tensor cores x 0.918 GHz x 512 (derived), 102.4 GB/s",
            min_memory_gib=12, max_memory_gib=24, sms=8),
    GPUSpec("Jetson Orin Nano 8GB (Super)", r"Orin", "8.7", 16.7, 2.1, 102.0, True,
            "Jetson Orin Nano Super data sheet: 67 INT8 sparse TOPS; 32 tensor cores x 1.02 GHz x 512 (derived), "
            "102 GB/s", max_memory_gib=12, sms=8),
)

# Largest shared memory one block may use, per compute capability (CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability": the opt-in maximum per block), in bytes.
SHARED_MEMORY_PER_BLOCK = {"7.5": 64 * 1024, "8.0": 163 * 1024, "8.6": 99 * 1024, "8.7": 163 * 1024,
                           "8.9": 99 * 1024, "9.0": 227 * 1024}
MAX_REGISTERS_PER_THREAD = 255


def gpu_spec(name: str, memory_gib: float | None = None) -> GPUSpec | None:
    """The datasheet entry of a GPU by its table name ("Jetson Orin NX 16GB"), or by its torch name (and
    memory, for the Jetson modules), or None."""
    for spec in GPUS:
        if spec.name == name:
            return spec
    for spec in GPUS:
        named = re.search(spec.pattern, name) is not None
        if named and (memory_gib is None or spec.min_memory_gib <= memory_gib < spec.max_memory_gib):
            return spec
    return None


@dataclass(frozen=True)
class Bound:
    flops: float
    bytes: float
    microseconds: float
    limited_by: str  # "compute" or "memory"


def roofline(spec: GPUSpec, flops: float, nbytes: float, precision: str) -> Bound:
    compute_us = flops / (spec.tflops(precision) * 1e12) * 1e6
    memory_us = nbytes / (spec.memory_gbps * 1e9) * 1e6
    return Bound(flops, nbytes, max(compute_us, memory_us), "compute" if compute_us >= memory_us else "memory")


def attention_work(mode: str, batch: int, frames: int, patches: int, heads: int, head_dim: int,
                   element_bytes: int) -> tuple[int, int]:
    """(FLOPs, minimum bytes) of one st_attention call: 4 Lq Lk Dh per group and head (QK^T and PV);
    q, k, v read once and the output written once."""
    length = 1 + frames * patches
    per_head = {"joint": length * length, "spatial": frames * (patches + 1) ** 2,
                "temporal": patches * frames * frames}[mode]
    flops = 4 * batch * heads * head_dim * per_head
    return flops, 4 * batch * length * heads * head_dim * element_bytes


def program_work(config: STTConfig, batch: int, precision: str, executed_flops: int | None = None) -> tuple[int, int]:
    """(FLOPs, minimum bytes) of one call of the compiled program on `batch` uint8 clips: the weights read
    once in the program's precision, the clips read once, the float32 logits written once."""
    from .flops import model_cost, program_flops

    flops = (executed_flops if executed_flops is not None else program_flops(config)) * batch
    weights = model_cost(config).parameters * PRECISION_BYTES[precision]
    clips = batch * config.num_frames * 3 * config.image_size**2
    return flops, weights + clips + batch * config.num_classes * 4


def program_bound(gpu_name: str, config: STTConfig, batch: int, precision: str, *, executed: int | None = None,
                  memory_gib: float | None = None) -> Bound | None:
    """The roofline bound of the whole compiled program on a GPU of the table, or None for another GPU."""
    spec = gpu_spec(gpu_name, memory_gib)
    if spec is None or (precision == "bf16" and not spec.bf16):
        return None
    flops, nbytes = program_work(config, batch, precision, executed)
    return roofline(spec, flops, nbytes, precision)


def bounds_markdown(config: STTConfig, batch_sizes=(1, 8, 64), precision: str = "fp16") -> str:
    """Per GPU type: the roofline lower bound (µs) of each attention mode and of the whole compiled program,
    at each batch size. Bounds, not measurements."""
    modes = ("temporal", "spatial") if config.attention == "divided" else ("joint",)
    element = PRECISION_BYTES[precision]
    header = ["GPU (sm)", "fp16 TFLOP/s", "GB/s"] + [f"{m} attention, B={b}" for m in modes for b in batch_sizes] + \
        [f"whole program, B={b}" for b in batch_sizes]
    lines = [
        f"Lower bounds in µs at {precision} for the `{config.num_frames}x{config.image_size}` config "
        f"(max of FLOPs / peak and minimum bytes / bandwidth; 'c' compute-bound, 'm' memory-bound). Per "
        "block, each attention mode runs once; the whole program: every layer's FLOPs, weights and clips "
        "read once. **Bounds from datasheet peaks, not measurements**: a real run is slower.",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    for spec in GPUS:
        cells = [f"{spec.name} ({spec.capability})", f"{spec.fp16_tflops:g}", f"{spec.memory_gbps:g}"]
        for mode in modes:
            for b in batch_sizes:
                flops, nbytes = attention_work(mode, b, config.num_frames, config.num_patches, config.num_heads,
                                               config.head_dim, element)
                bound = roofline(spec, flops, nbytes, precision)
                cells.append(f"{bound.microseconds:.2f} {bound.limited_by[0]}")
        for b in batch_sizes:
            flops, nbytes = program_work(config, b, precision)
            bound = roofline(spec, flops, nbytes, precision)
            cells.append(f"{bound.microseconds:.0f} {bound.limited_by[0]}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Sources: " + "; ".join(f"{s.name}: {s.source}" for s in GPUS) + "."]
    return "\n".join(lines)
