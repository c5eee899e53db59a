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

import contextlib
import os
import threading

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


# --- float32 means float32 on CUDA ---------------------------------------------------------------------------
#
# cuDNN runs float32 convolutions in TF32 by default (torch.backends.cudnn.conv.fp32_precision "tf32", formerly
# allow_tf32 True): 10-bit mantissas. Rounding the paper model's convolution inputs and weights to TF32 alone
# moved its logits by 6.0e-4 (relative L2, measured on the CPU), six times the float32 tolerance of 1e-4. So a
# float32 program runs with TF32 off for convolutions and matrix products, for the length of each call (warm-up,
# CUDA graph capture and eager calls alike: they all go through CompiledSTT's calls); the user's settings are
# restored after. Counted, so that calls from several threads at once set and restore them once.

_tf32_lock = threading.Lock()
_tf32_users = 0
_tf32_saved: dict = {}


def _tf32_flags() -> dict:
    """The current TF32 settings: the fp32_precision API (torch >= 2.9) where it exists, else allow_tf32."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return {"conv": conv.fp32_precision, "matmul": torch.backends.cuda.matmul.fp32_precision}
    return {"cudnn": torch.backends.cudnn.allow_tf32, "cublas": torch.backends.cuda.matmul.allow_tf32}


def _set_tf32_flags(flags: dict) -> None:
    if "conv" in flags:
        torch.backends.cudnn.conv.fp32_precision = flags["conv"]
        torch.backends.cuda.matmul.fp32_precision = flags["matmul"]
    else:
        torch.backends.cudnn.allow_tf32 = flags["cudnn"]
        torch.backends.cuda.matmul.allow_tf32 = flags["cublas"]


def tf32_in_force() -> bool:
    """Whether float32 convolutions or matrix products may run in TF32 now."""
    flags = _tf32_flags()
    if "conv" in flags:
        return flags["conv"] == "tf32" or flags["matmul"] == "tf32"
    return bool(flags["cudnn"] or flags["cublas"])


@contextlib.contextmanager
def exact_float32(device: torch.device, dtype: torch.dtype):
    """TF32 off for the block when a float32 program runs on CUDA (above); nothing otherwise."""
    global _tf32_users
    if device.type != "cuda" or dtype != torch.float32:
        yield
        return
    with _tf32_lock:
        if _tf32_users == 0:
            _tf32_saved.update(_tf32_flags())
            ieee = ({"conv": "ieee", "matmul": "ieee"} if "conv" in _tf32_saved else
                    {"cudnn": False, "cublas": False})
            _set_tf32_flags(ieee)
        _tf32_users += 1
    try:
        yield
    finally:
        with _tf32_lock:
            _tf32_users -= 1
            if _tf32_users == 0:
                _set_tf32_flags(dict(_tf32_saved))
                _tf32_saved.clear()
