"""`stt-fast serve`: the model as an HTTP service on Ray Serve (stt_fast.serving)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from .common import add_quiet, device_name, non_negative_float, positive_float, positive_int

BACKENDS = ("reference", "compiled", "onnx", "tensorrt")


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "serve", help="the model as an HTTP service on Ray Serve: dynamic batching, backpressure, metrics",
        description="Serve POST /v1/predict (a video file as multipart field 'file', or a .npy uint8 [T, 3, H, W] "
                    "clip), GET /healthz, /readyz and /metrics on HOST:PORT until Ctrl-C. Concurrent requests "
                    "share forward passes of up to --max-batch clips; a full queue answers 503 with Retry-After. "
                    "Needs the serve extra: pip install 'stt-fast[serve]'.")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="an stt_fast checkpoint (backends reference and compiled)")
    model.add_argument("--onnx", help="an exported ONNX file (backend onnx)")
    model.add_argument("--engine", help="a TensorRT engine with its sidecar (backend tensorrt; one GPU per replica)")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="default: compiled for --checkpoint, onnx for --onnx, tensorrt for --engine")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=positive_int, default=8000, help="HTTP port")
    p.add_argument("--ray", default="local", metavar="local|auto|ADDRESS",
                   help="local: start Ray in this machine; auto: join the running cluster; or a cluster address")
    p.add_argument("--replicas", type=positive_int, default=1, help="model replicas (one model each)")
    p.add_argument("--gpus-per-replica", type=non_negative_float, default=0.0,
                   help="GPUs per replica (1: one model or engine per GPU)")
    p.add_argument("--cpus-per-replica", type=positive_float, default=1.0, help="CPUs per replica")
    p.add_argument("--max-batch", type=positive_int, default=16, help="most clips in one forward pass")
    p.add_argument("--batch-wait-ms", type=non_negative_float, default=10.0,
                   help="longest a batch waits to fill before it runs")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="clips waiting for a replica before new requests get 503")
    p.add_argument("--max-upload-mb", type=positive_float, default=64.0, help="largest request body (413 above)")
    p.add_argument("--timeout-s", type=positive_float, default=60.0, help="longest a request waits for its answer "
                                                                         "(504 after it)")
    p.add_argument("--device", default=None, type=device_name,
                   help="cpu, cuda or cuda:N in each replica (default: cuda when the replica has a GPU)")
    add_quiet(p)
    p.set_defaults(func=run)


def backend_of(args: argparse.Namespace) -> str:
    """The backend given, or the one the model file implies; ValueError for a file the backend cannot run."""
    implied = "tensorrt" if args.engine else "onnx" if args.onnx else "compiled"
    backend = args.backend or implied
    wants = {"reference": "checkpoint", "compiled": "checkpoint", "onnx": "onnx", "tensorrt": "engine"}[backend]
    if getattr(args, wants) is None:
        raise ValueError(f"backend {backend!r} runs --{wants}")
    return backend


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    try:
        from stt_fast.serving.app import ServeOptions, check_port_free, start, stop
    except ImportError as e:
        raise ImportError(f"stt-fast serve needs Ray Serve: pip install 'stt-fast[serve]' ({e})") from None
    from stt_fast.predictors import ModelSpec

    spec = ModelSpec(backend_of(args), args.checkpoint, args.onnx, args.engine, args.device)
    if not Path(spec.file()).is_file():
        raise FileNotFoundError(f"model file not found: {spec.file()}")
    spec.config()  # a file that is not a model fails here, in one line, before Ray starts
    options = ServeOptions(spec, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                           cpus_per_replica=args.cpus_per_replica, max_batch=args.max_batch,
                           batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                           max_upload_mb=args.max_upload_mb, request_timeout_s=args.timeout_s)
    check_port_free(args.host, args.port)
    print(f"[serve] starting Ray and {args.replicas} replica(s) of the {spec.backend} backend "
          "(building each model takes a while)...", file=sys.stderr)
    began = time.monotonic()
    started_ray = start(options, host=args.host, port=args.port, ray_address=args.ray)
    try:
        # SIGTERM (docker stop, systemd, kill) stops the service as Ctrl-C does: Serve and Ray shut down,
        # status 0. Set after Ray starts, whose own handler for it would abort the process.
        signal.signal(signal.SIGTERM, _interrupt)
        url = f"http://{args.host}:{args.port}"
        print(f"[serve] ready in {time.monotonic() - began:.0f} s: POST {url}/v1/predict "
              f"(curl -F file=@clip.mp4 {url}/v1/predict); {url}/metrics; Ctrl-C stops", file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] stopping", file=sys.stderr)
        return 0
    finally:
        stop(started_ray)
