"""Annotation throughput: clips per second of `stt-fast annotate` in one process and on a local Ray cluster
with 1 and 2 inference actors, on a synthetic collection, for the given configs (random weights: speed,
not accuracy).

    python -m stt_fast.benchmarks.bench_annotate [--configs tiny,paper] [--clips-per-class 10] [--output DIR]

Every run starts from an empty output folder and includes what a user waits for: decoding, sampling,
inference, writing the part files, and, with Ray, starting the local cluster and the actors.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
from pathlib import Path

import torch

from stt_fast.annotate import annotate
from stt_fast.checkpoint import save_checkpoint
from stt_fast.config import get_config
from stt_fast.data.synthetic import SynthConfig, write_synthetic_dfew
from stt_fast.model import STT

from .machine import machine_header, store_result

PLANS = (("in-process", None, 1), ("ray local, 1 worker", "local", 1), ("ray local, 2 workers", "local", 2))


def run(configs=("tiny", "paper"), clips_per_class: int = 10, batch_size: int = 8, output_dir=None,
        progress: bool = True) -> tuple[dict, Path | None]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="stt_fast-bench-annotate-") as tmp:
        tmp = Path(tmp)
        data = write_synthetic_dfew(tmp / "data", SynthConfig(clips_per_class=clips_per_class), progress=progress)
        for name in configs:
            torch.manual_seed(0)
            checkpoint = save_checkpoint(STT(get_config(name)).eval(), tmp / f"{name}.safetensors")
            for label, ray_address, workers in PLANS:
                result = annotate(data, tmp / f"out-{name}-{label.replace(' ', '-').replace(',', '')}",
                                  checkpoint=str(checkpoint), device="cpu", batch_size=batch_size, fmt="parquet",
                                  ray_address=ray_address, workers=workers)
                rows.append({"config": name, "plan": label, "workers": workers, "clips": result.written,
                             "seconds": round(result.seconds, 2),
                             "clips_per_second": round(result.clips_per_second, 3)})
                if progress:
                    print(f"[bench annotate] {name}, {label}: {result.written} clips in {result.seconds:.1f} s, "
                          f"{result.clips_per_second:.2f} clips/s")
    header = machine_header(torch.device("cpu"))
    result = {"schema": 1, "benchmark": "annotate",
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": header, "batch_size": batch_size, "clips_per_class": clips_per_class, "rows": rows,
              "note": "wall time of whole runs: decoding, inference, writing; with Ray, cluster and actor start-up"}
    path = store_result(result, output_dir, "annotate", name="annotate") if output_dir is not None else None
    return result, path


def markdown(result: dict) -> str:
    lines = ["| config | plan | clips | seconds | clips/s |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['config']} | {r['plan']} | {r['clips']} | {r['seconds']:.1f} | {r['clips_per_second']:.2f} |"
              for r in result["rows"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,paper")
    parser.add_argument("--clips-per-class", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default="results", help="results folder (the project's: benchmarks/results)")
    args = parser.parse_args(argv)
    result, path = run(args.configs.split(","), args.clips_per_class, args.batch_size, args.output)
    print(markdown(result))
    if path:
        print(f"[bench annotate] written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
