"""`stt-fast annotate`: label every clip of a video collection, resumably, optionally on Ray."""

from __future__ import annotations

import argparse
import sys

from .common import (
    add_backend_args,
    add_face_args,
    add_limit_args,
    add_quiet,
    device_name,
    limits_from_args,
    non_negative_float,
    positive_float,
    positive_int,
)


def _cmd_annotate(args: argparse.Namespace) -> int:
    import time

    from stt_fast.annotate import annotate
    from stt_fast.progress import progress_bar

    bar = progress_bar(desc="[annotate]", total=1, enabled=not args.quiet, unit="clip")
    first: list[tuple[float, int]] = []

    def on_batch(done: int, total: int, errors: int) -> None:
        first[:] = first or [(time.perf_counter(), done)]
        rate = (done - first[0][1]) / max(time.perf_counter() - first[0][0], 1e-9)
        bar.total, bar.n = total, done
        bar.set_postfix_str(f"{rate:.1f} clips/s, {errors} unreadable")
        bar.refresh()

    result = annotate(args.source, args.output, backend=args.backend, checkpoint=args.checkpoint, onnx=args.onnx,
                      engine=args.engine, device=args.device, batch_size=args.batch_size, detect_face=args.detect_face,
                      no_face=args.no_face, limits=limits_from_args(args), fmt=args.format, ray_address=args.ray,
                      workers=args.workers,
                      gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker, on_batch=on_batch,
                      retry_failed=args.retry_failed)
    bar.close()
    print(f"[annotate] {result.total} clips in {args.source}: {result.skipped_done} already in {result.output}, "
          f"{result.written} annotated now ({result.errors} could not be read) in {result.seconds:.1f} s, "
          f"{result.clips_per_second:.2f} clips/s")
    if result.failed:
        print(f"stt-fast annotate: {len(result.failed)} of {result.total} clips could not be read (their rows hold "
              f"the error, e.g. {result.failed[0]}); --retry-failed tries them again", file=sys.stderr)
        return 2
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("annotate", help="label every clip of a video collection, resumably, optionally on Ray",
                       description="Label every clip of SOURCE (a folder searched recursively, a DFEW-layout data "
                                   "set, or a text file of paths) into OUTPUT (Parquet or JSON lines part files). "
                                   "Resumable: a second run skips what is written. --ray runs decoding as Ray tasks "
                                   "and inference in an actor pool (pip install 'stt-fast[ray]').")
    p.add_argument("source", help="folder, DFEW-layout data set, or text file of paths")
    add_backend_args(p)
    p.add_argument("-o", "--output", required=True, help="output folder (created; resumed when it exists)")
    p.add_argument("--format", default=None, choices=["parquet", "jsonl"],
                   help="part file format (default: parquet where pyarrow is installed, else jsonl)")
    p.add_argument("--ray", default=None, metavar="local|auto|ADDRESS",
                   help="run on Ray: 'local' starts a local cluster, 'auto' joins the running one, or a cluster "
                        "address (default: in this process, no Ray)")
    p.add_argument("--workers", type=positive_int, default=1, help="inference actors (with --ray)")
    p.add_argument("--gpus-per-worker", type=non_negative_float, default=0.0,
                   help="GPUs per actor (with --ray; 1 = one model or engine per GPU)")
    p.add_argument("--cpus-per-worker", type=positive_float, default=1.0, help="CPUs per actor (with --ray)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="clips per batch (and per part file)")
    add_face_args(p)
    add_limit_args(p)
    p.add_argument("--retry-failed", action="store_true",
                   help="annotate again the clips whose rows in OUT hold an error (unreadable before)")
    p.add_argument("--device", default=None, type=device_name,
                   help="cpu, cuda or cuda:N for each worker (default: cuda when available)")
    add_quiet(p)
    p.set_defaults(func=_cmd_annotate)
