"""Timeline throughput: windows per second of stt_fast.Timeline with the per-frame feature cache and
without it (every window's frames through the whole model), for the given configs and backends, on a
synthetic recording decoded once into memory (random weights: speed, not accuracy).

    python -m stt_fast.benchmarks.bench_timeline [--configs tiny,paper] [--backends torch,onnxruntime]
                                                  [--windows 24] [--output DIR]

Window 2 s and stride 0.5 s for the paper config (16 frames a window, 4 new per window), window 1 s and
stride 0.25 s for tiny (4 frames, 1 new). Expected from the FLOPs (stt_fast.flops): a window from scratch
costs the program's executed FLOPs (33.19 G for the paper model, 11.22 G of them the backbone's), a
cached one the backbone's for its new frames plus the rest; the ratio is the speed-up the cache can give
when time follows FLOPs.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import numpy as np
import torch

import stt_fast
from stt_fast.config import get_config
from stt_fast.data.synthetic import synth_clip
from stt_fast.flops import model_cost, program_flops
from stt_fast.model import STT
from stt_fast.timeline import Timeline

from .machine import machine_header, store_result

WINDOWS = {"paper": (2.0, 0.5), "tiny": (1.0, 0.25)}


def _recording(config, windows: int, window: float, stride: float, fps: int = 25) -> list[tuple[np.ndarray, float]]:
    import random

    seconds = window + (windows - 1) * stride + 1 / fps
    count = int(np.ceil(seconds * fps)) + 1
    frames = synth_clip(0, count, max(config.image_size, 64), random.Random(0))
    return [(frame, i / fps) for i, frame in enumerate(frames)]


def _timed(model, frames, window, stride, cache) -> tuple[float, Timeline]:
    timeline = Timeline(model, window=window, stride=stride, cache=cache)
    started = time.perf_counter()
    for frame, stamp in frames:
        timeline.push(frame, stamp)
    return time.perf_counter() - started, timeline


def run(configs=("tiny", "paper"), backends=("torch", "onnxruntime"), windows: int = 24, output_dir=None,
        progress: bool = True) -> tuple[dict, Path | None]:
    rows = []
    for name in configs:
        config = get_config(name)
        window, stride = WINDOWS.get(name, (2.0, 0.5))
        frames = _recording(config, windows, window, stride)
        backbone, executed = model_cost(config).backbone_flops_per_clip, program_flops(config)
        new = max(1, round(stride / (window / config.num_frames)))
        cached_flops = backbone * new / config.num_frames + executed - backbone
        torch.manual_seed(0)
        model = STT(config).eval()
        for backend in backends:
            compiled = stt_fast.compile(model, backend=backend)
            _timed(compiled, frames[: len(frames) // 3], window, stride, True)  # warm-up: exports, first calls
            _timed(compiled, frames[: len(frames) // 3], window, stride, False)
            seconds = {}
            for cache in (True, False):
                seconds[cache], timeline = _timed(compiled, frames, window, stride, cache)
                rows.append({"config": name, "backend": compiled.backend, "frame_cache": cache,
                             "window_s": window, "stride_s": timeline.stride, "windows": len(timeline.results),
                             "seconds": round(seconds[cache], 3),
                             "windows_per_second": round(len(timeline.results) / seconds[cache], 3),
                             "backbone_frames": timeline.backbone_frames})
            saved = 1 - rows[-2]["backbone_frames"] / rows[-1]["backbone_frames"]
            rows[-2] |= {"speedup": round(seconds[False] / seconds[True], 3), "backbone_work_saved": round(saved, 3),
                         "expected_speedup_from_flops": round(executed / cached_flops, 3)}
            if progress:
                print(f"[bench timeline] {name}, {compiled.backend}: {rows[-2]['windows_per_second']:.2f} windows/s "
                      f"cached, {rows[-1]['windows_per_second']:.2f} from scratch ({rows[-2]['speedup']:.2f}x; "
                      f"{saved:.0%} of the backbone's frames saved; FLOPs predict "
                      f"{rows[-2]['expected_speedup_from_flops']:.2f}x)")
    result = {"schema": 1, "benchmark": "timeline",
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_header(torch.device("cpu")), "rows": rows,
              "note": "wall time of Timeline.push over a recording in memory (no decoding), one window at a time"}
    path = store_result(result, output_dir, "timeline", name="timeline") if output_dir is not None else None
    return result, path


def markdown(result: dict) -> str:
    lines = ["| config | backend | frame cache | windows | windows/s | backbone frames | speed-up | FLOPs predict |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        extra = (f"{r['speedup']:.2f}x | {r['expected_speedup_from_flops']:.2f}x" if "speedup" in r else " | ")
        lines.append(f"| {r['config']} | {r['backend']} | {'yes' if r['frame_cache'] else 'no'} | {r['windows']} | "
                     f"{r['windows_per_second']:.2f} | {r['backbone_frames']} | {extra} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,paper")
    parser.add_argument("--backends", default="torch,onnxruntime")
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--output", default="results", help="results folder (the project's: benchmarks/results)")
    args = parser.parse_args(argv)
    result, path = run(args.configs.split(","), args.backends.split(","), args.windows, args.output)
    print(markdown(result))
    if path:
        print(f"[bench timeline] written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
