"""The suite's backends under pytest-benchmark (the project's pytest benchmarking tool):

    pytest benchmarks/pytest_backends.py --benchmark-only [--benchmark-json out.json]

STT_BENCH_CONFIG (default "tiny"), STT_BENCH_BATCHES (default "1,8") and STT_BENCH_DEVICE choose the
cases. Each case builds the backend once (build time recorded), then pytest-benchmark times
device-synchronised calls; accuracy against the float32 reference and the machine slug go into
extra_info beside the timing. Unavailable backends are skipped with their reason. The CLI
(`stt-fast bench`) runs the same backends through benchmarks/harness.py.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from stt_fast.benchmarks.backends import BACKENDS
from stt_fast.benchmarks.harness import exact_float32
from stt_fast.benchmarks.machine import machine_header
from stt_fast.benchmarks.timing import synchronize

from stt_fast import STT, get_config
from stt_fast.accuracy import logits_agreement

CONFIG = os.environ.get("STT_BENCH_CONFIG", "tiny")
BATCHES = [int(b) for b in os.environ.get("STT_BENCH_BATCHES", "1,8").split(",")]
DEVICE = torch.device(os.environ.get("STT_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return STT(get_config(CONFIG)).eval()


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="stt_fast-pytest-bench-") as tmp:
        yield Path(tmp)


_built: dict[str, object] = {}


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("name", list(BACKENDS))
def test_backend(benchmark, model, workdir, name, batch):
    backend = BACKENDS[name]
    reason = backend.unavailable(DEVICE)
    if reason:
        pytest.skip(reason)
    if name not in _built:
        _built[name] = backend.build(model, DEVICE, workdir)
    built = _built[name]
    c = model.config
    clips = torch.rand(batch, c.num_frames, 3, c.image_size, c.image_size, generator=torch.Generator().manual_seed(1))
    with exact_float32(), torch.no_grad():
        reference = model(clips)
    x = clips.to(built.input_device)

    def call():
        out = built.run(x)
        synchronize(DEVICE)
        return out

    logits = benchmark.pedantic(call, rounds=10, warmup_rounds=2, iterations=1).float().cpu()
    benchmark.extra_info.update({
        "machine": machine_header(DEVICE)["slug"], "config": CONFIG, "batch": batch,
        "build_seconds": built.build_seconds, **logits_agreement(logits, reference)})
