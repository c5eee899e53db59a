"""Test set-up. Kernels run through Triton's interpreter where no GPU is present; the variable must be
set before triton is first imported, hence here, before any test module loads."""

import os
import tempfile

import torch

# Exported graphs and engines are cached under XDG_CACHE_HOME/stt_fast: keep the tests' out of the
# user's cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="stt_fast-test-cache-")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
