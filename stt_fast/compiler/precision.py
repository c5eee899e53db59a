"""Which precision stt_fast.compile runs in when none is asked for (dtype=None or "auto").

On a CUDA GPU: float16 (tensor cores; validated at float16's tolerance).
On a CPU: bfloat16 where the CPU has native bf16 arithmetic (AVX512_BF16 or AMX-BF16), else float32. That is
OpenVINO's own rule for its CPU plugin (its inference precision defaults to bf16 on such CPUs), and on this
project's AVX-512 EPYC it made the paper model 1.7x faster than float32. Where bf16 is emulated it is
slower than float32, so a CPU without the instructions is never given it automatically. The bf16 program
is still validated against the float32 reference at bf16's tolerance, and compile falls back to float32
when it fails (the reason is kept on the module as .dtype_reason).
"""

from __future__ import annotations

import os

import torch

BF16_UNITS = ("avx512_bf16", "amx_bf16")
ISA_OVERRIDE = "STT_FAST_CPU_ISA"  # comma-separated instruction sets the choice assumes instead of this CPU's


def machine_isa() -> list[str]:
    """The instruction sets the automatic choice reads: this CPU's (stt_fast.environment.cpu_isa), or those
    $STT_FAST_CPU_ISA names (the test suite pins it, so that its results do not depend on the machine)."""
    override = os.environ.get(ISA_OVERRIDE)
    if override is not None:
        return [name.strip() for name in override.split(",") if name.strip()]
    from stt_fast.environment import cpu_isa

    return cpu_isa()


def native_bf16(isa: list[str] | set[str]) -> str | None:
    """The instruction set giving this CPU native bf16 arithmetic, or None."""
    return next((name for name in BF16_UNITS if name in isa), None)


def default_precisions(device: torch.device, isa: list[str] | set[str] | None = None) -> tuple[list[torch.dtype], str]:
    """(the dtypes to try in order, why): on CUDA [float16]; on a CPU [bfloat16, float32] with native bf16,
    else [float32]. isa: the CPU's instruction sets (default: machine_isa())."""
    if device.type == "cuda":
        return [torch.float16], "float16 on CUDA (tensor cores)"
    unit = native_bf16(machine_isa() if isa is None else isa)
    if unit:
        return [torch.bfloat16, torch.float32], f"bfloat16: this CPU has native bf16 arithmetic ({unit})"
    return [torch.float32], "float32: this CPU has no native bf16 arithmetic (neither avx512_bf16 nor amx_bf16)"


# The precisions each backend runs (the others run every one): ONNX Runtime's CPU provider has no bfloat16
# kernels for the program's operators; OpenVINO's x86 CPU plugin computes in float32 or bfloat16.
PRECISIONS = {"onnxruntime": (torch.float32, torch.float16), "openvino": (torch.float32, torch.bfloat16),
              "tensorrt": (torch.float16, torch.float32)}


def runs(backend: str, dtype: torch.dtype) -> bool:
    return dtype in PRECISIONS.get(backend, (dtype,))
