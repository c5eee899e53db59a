"""The machine a result was measured on, and its measured ceilings.

Results are stored per machine (store_result). The ceilings are measured, not taken from datasheets:
a large matrix product (float16 on a GPU, float32 on a CPU) for the arithmetic peak, and a large device
copy (bytes read + written) for the memory bandwidth, each the fastest of many runs; the suite measures
them before and after its runs and keeps the higher. Each result's "fraction of the limit" is model
FLOPs / time / matmul peak.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

from stt_fast.environment import environment_info, machine_slug
from stt_fast.files import write_text_atomic

from .timing import measure


def store_result(result: dict, output_dir, *folders: str, name: str) -> Path:
    """Write a result as OUTPUT_DIR/<machine slug>/<folders...>/<created stamp>-<name>.json (atomically)."""
    stamp = result["created"].replace(":", "").replace("-", "").replace("+0000", "Z")
    path = Path(output_dir) / result["machine"]["slug"] / Path(*folders) / f"{stamp}-{name}.json"
    write_text_atomic(path, json.dumps(result, indent=1))
    return path


def source_revision() -> str | None:
    """The git commit of the code being measured, when it runs from a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def machine_header(device: torch.device) -> dict:
    from stt_fast import __version__

    info = environment_info()
    header = {"slug": machine_slug(info, device.type), "device": str(device), "stt_fast": __version__,
              "source_revision": source_revision(), **info}
    if device.type == "cuda":
        header["gpu"] = info["gpus"][device.index or 0]
    return header


def measure_ceilings(device: torch.device) -> dict:
    """{'matmul_tflops', 'matmul_dtype', 'matmul_size', 'copy_gbps'} measured on device."""
    if device.type == "cuda":
        n, dtype = 8192, torch.float16
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        src = torch.randn(2**28 // 2, device=device, dtype=torch.float16)  # 256 MiB, many times the L2
    else:
        n, dtype = 2048, torch.float32
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        src = torch.randn(2**26 // 4, dtype=torch.float32)  # 64 MiB
    out = torch.empty(n, n, device=device, dtype=dtype)
    # A ceiling is the best the machine did: the fastest run, not the median.
    matmul = measure(lambda: torch.mm(a, b, out=out), device, warmup=3, min_runs=10, min_seconds=2.0)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), device, warmup=3, min_runs=10, min_seconds=1.0)
    return {"matmul_tflops": float(f"{2 * n**3 / (matmul.min_ms * 1e-3) / 1e12:.4g}"), "matmul_dtype": str(dtype),
            "matmul_size": n,
            "copy_gbps": round(2 * src.numel() * src.element_size() / (copy.min_ms * 1e-3) / 1e9, 1)}


def best_ceilings(*measured: dict) -> dict:
    """The higher of several measurements (a transient slow spell must not lower the ceiling)."""
    return {"matmul_tflops": max(m["matmul_tflops"] for m in measured),
            "copy_gbps": max(m["copy_gbps"] for m in measured),
            "matmul_dtype": measured[0]["matmul_dtype"], "matmul_size": measured[0]["matmul_size"]}
