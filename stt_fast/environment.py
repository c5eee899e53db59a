"""What machine and software this is: the header of every benchmark result and of `stt-fast info`."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
from typing import Any

import torch

OPTIONAL_PACKAGES = ("triton", "numpy", "onnx", "onnxruntime", "onnxscript", "onnxsim", "onnxslim", "openvino", "ray",
                     "tensorrt", "safetensors", "pycuda")


def package_version(name: str) -> str | None:
    """Installed version of a package, or None. tensorrt is asked directly: its wheels vary in name."""
    if name == "tensorrt":
        try:
            return importlib.import_module("tensorrt").__version__
        except Exception:
            return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction sets that decide what a CPU backend can run fast: bf16 and int8 (VNNI, AMX) units.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa(flags: set[str] | None = None) -> list[str]:
    """The ISA_FLAGS among flags (this CPU's by default), in ISA_FLAGS' order."""
    flags = cpu_flags() if flags is None else flags
    return [name for name in ISA_FLAGS if name in flags]


def isa_tag(isa: list[str]) -> str:
    """A short name for a CPU's vector units, for result folders: 'amx', 'avx512-bf16-vnni', 'avx2'..."""
    if "amx_bf16" in isa:
        return "amx"
    if "avx512f" in isa:
        return "-".join(["avx512"] + [n for n, f in (("bf16", "avx512_bf16"), ("vnni", "avx512_vnni")) if f in isa])
    if "avx2" in isa:
        return "avx2-vnni" if "avx_vnni" in isa else "avx2"
    return ""


def nvidia_driver_version() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def gpu_info(device: int = 0) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count}


def environment_info() -> dict[str, Any]:
    """Versions and devices: python, torch (+CUDA, cuDNN), optional packages, CPU, GPUs, driver."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_isa": cpu_isa(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torch_threads": torch.get_num_threads(),
    }
    info.update({name: package_version(name) for name in OPTIONAL_PACKAGES})
    info["gpus"] = [gpu_info(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    info["driver"] = nvidia_driver_version() if info["gpus"] else None
    return info


def machine_slug(info: dict[str, Any] | None = None, device: str = "auto") -> str:
    """A folder name for results of this machine type: the GPU's name, or the CPU model and core count."""
    info = environment_info() if info is None else info
    if info["gpus"] and device != "cpu":
        label = info["gpus"][0]["name"]
    else:
        label = f"cpu {info['cpu']} {info['cpu_count']}c {isa_tag(info.get('cpu_isa', []))}"
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
