"""The one timing helper of the project: warm up, then time many device-synchronised runs.

On CUDA each run is bracketed by CUDA events on the current stream; on the CPU by time.perf_counter.
Reported: median, p90, p99, mean, min.

measure() times one function. measure_interleaved() times several functions in round-robin rounds,
so that a slow spell of a shared or throttling machine hits all of them alike and the ratios between
them, which is what the suite reports, stay fair. Switching between runtimes disturbs the first call
after the switch (measured on the 2-core CPU: OpenVINO at 160 ms alone, 190-198 ms right after a
PyTorch call, whose weights and threads took the caches and cores): with settle=1 each turn starts with
an untimed call, so that every function is timed as it runs when it runs alone.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    warmup_runs: int

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of an ascending list, q in [0, 100]."""
    if not sorted_values:
        raise ValueError("no values")
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one device-synchronised call."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def summarize(samples: list[float], warmup: int) -> Timing:
    ordered = sorted(samples)
    return Timing(statistics.median(ordered), percentile(ordered, 90), percentile(ordered, 99),
                  statistics.fmean(ordered), ordered[0], len(ordered), warmup)


def measure(fn: Callable[[], object], device: torch.device | str = "cpu", *, warmup: int = 3,
            min_runs: int = 10, max_runs: int = 200, min_seconds: float = 1.0) -> Timing:
    """Time fn() after `warmup` calls: at least min_runs runs and min_seconds in total, at most max_runs."""
    return measure_interleaved({"fn": fn}, device, warmup=warmup, min_runs=min_runs, max_runs=max_runs,
                               min_seconds=min_seconds)["fn"]


def measure_interleaved(fns: dict[str, Callable[[], object]], device: torch.device | str = "cpu", *,
                        warmup: int = 3, min_runs: int = 10, max_runs: int = 200, min_seconds: float = 1.0,
                        runs_per_round: int = 1, settle: int = 0,
                        on_run: Callable[[str], None] | None = None) -> dict[str, Timing]:
    """Time each function: rounds of `settle` untimed then `runs_per_round` timed calls of each in turn,
    until every one has at least min_runs runs and at least min_seconds of its own run time (at most
    max_runs). on_run(name) is called after each timed run (progress)."""
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}

    def more(name: str) -> bool:
        runs = samples[name]
        return len(runs) < max_runs and (len(runs) < min_runs or sum(runs) < min_seconds * 1e3)

    while any(more(name) for name in fns):
        for name, fn in fns.items():
            if more(name):
                for _ in range(settle):
                    fn()
                synchronize(device)
                for _ in range(runs_per_round):
                    samples[name].append(time_once(fn, device))
                    if on_run is not None:
                        on_run(name)
    return {name: summarize(runs, warmup) for name, runs in samples.items()}
