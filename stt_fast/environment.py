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
        label = f"cpu {info['cpu']} {info['cpu_count']}c"
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
