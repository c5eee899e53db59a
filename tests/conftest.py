"""Test set-up. Kernels run on the GPU where there is one, else through Triton's interpreter; the
variable must be set before triton is first imported, hence here, before any test module loads."""

import atexit
import os
import shutil
import tempfile

import torch

# Exported graphs and engines are cached under XDG_CACHE_HOME/stt_fast: keep the tests' out of the
# user's cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="stt_fast-test-cache-")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# stt_fast.compile's automatic precision follows the CPU (bfloat16 where it has native bf16): the suite pins
# an AVX2 CPU's choice (float32), in this process and the commands it starts, so that its results do not
# depend on the machine CI lands on; tests of the choice itself set the instruction sets they need.
os.environ["STT_FAST_CPU_ISA"] = "avx2"

import pytest

atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)  # nothing left behind in /tmp

# Under pytest-xdist (make test: one worker per core) each worker computes on one thread; alone, on two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    """Every test draws from seed 0; scripts/kernel_margins.py sweeps others through STT_FAST_TEST_SEED."""
    torch.manual_seed(int(os.environ.get("STT_FAST_TEST_SEED", "0")))


@pytest.fixture
def kernel_device(monkeypatch):
    """Where the kernel tests run the Triton kernels: the GPU, else the interpreter on the CPU; never the
    plain-PyTorch fallback, which would make a kernel test test its reference (it fails instead)."""
    import importlib

    attention = importlib.import_module("stt_fast.kernels.st_attention")
    layer_norm = importlib.import_module("stt_fast.kernels.add_layer_norm")
    linear = importlib.import_module("stt_fast.kernels.fused_linear")
    cls = importlib.import_module("stt_fast.kernels.cls_attention")
    pool = importlib.import_module("stt_fast.kernels.max_pool")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not attention.interpreting():
        pytest.fail("the Triton kernels can run here neither on a GPU nor through TRITON_INTERPRET=1")

    def no_fallback(*args, **kwargs):
        raise AssertionError("the kernel fell back to its plain-PyTorch reference")

    monkeypatch.setattr(attention, "st_attention_reference", no_fallback)
    monkeypatch.setattr(layer_norm, "add_layer_norm_reference", no_fallback)
    monkeypatch.setattr(linear, "fused_linear_reference", no_fallback)
    monkeypatch.setattr(cls, "cls_attention_reference", no_fallback)
    monkeypatch.setattr(pool, "max_pool2d_reference", no_fallback)
    return device
