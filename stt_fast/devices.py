"""Which CUDA device a torch.device names, for the parts (TensorRT, Triton launches) that work on the
current CUDA device rather than on a tensor's."""

from __future__ import annotations

import torch


def cuda_device_index(device: str | torch.device) -> int:
    """cuda:N -> N; a bare "cuda" -> the current CUDA device, which is what PyTorch means by it (not 0).
    ValueError for a device that is not CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"expected a CUDA device, got {device}")
    return torch.cuda.current_device() if device.index is None else device.index


def available_devices() -> list[str]:
    """The devices stt_fast can run on here: the CPU and each CUDA GPU."""
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def check_device(text: str) -> torch.device:
    """The torch.device named by text, if this machine has it; ValueError naming the devices it has
    otherwise (before any work starts: an option's type at parse time)."""
    here = ", ".join(available_devices())
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {text!r}; this machine has: {here}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device {text!r}: stt_fast runs on cpu and cuda devices; this machine has: {here}")
    if not torch.cuda.is_available():
        why = "this PyTorch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device {text!r}: {why}; this machine has: {here}")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {text!r}: there are {torch.cuda.device_count()} CUDA GPU(s); this machine has: "
                         f"{here}")
    return device
