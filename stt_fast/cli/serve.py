"""`stt-fast serve`: the model as an HTTP service: embedded (one process on uvicorn, the default) or on Ray Serve
(--ray, for clusters) (stt_fast.serving)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from .common import (
    add_face_args,
    add_limit_args,
    add_quiet,
    device_name,
    limits_from_args,
    non_negative_float,
    positive_float,
    positive_int,
)

BACKENDS = ("reference", "compiled", "onnx", "tensorrt")
API_KEY_VARIABLE = "STT_FAST_API_KEY"


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "serve", help="the model as an HTTP service: dynamic batching, bounded uploads, metrics, KServe v2",
        description="Serve POST /v1/predict (a video file as multipart field 'file' or as the raw body, or a .npy "
                    "uint8 [T, 3, H, W] clip), the Open Inference Protocol (KServe v2: /v2/models/NAME/infer, as "
                    "tritonclient calls it), GET /healthz, /readyz and /metrics on HOST:PORT until Ctrl-C or "
                    "SIGTERM. One process on uvicorn with the model in it by default; --ray runs it on Ray Serve "
                    "(pip install 'stt-fast[serve]'). Concurrent requests share forward passes of up to "
                    "--max-batch clips; a full service answers 503 with Retry-After.")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="an stt_fast checkpoint (backends reference and compiled)")
    model.add_argument("--onnx", help="an exported ONNX file (backend onnx)")
    model.add_argument("--engine", help="a TensorRT engine with its sidecar (backend tensorrt)")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="default: compiled for --checkpoint, onnx for --onnx, tensorrt for --engine")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=positive_int, default=8000, help="HTTP port")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' (16 characters or more; or set ${API_KEY_VARIABLE}); "
                        "the health routes stay open")
    p.add_argument("--ray", default=None, metavar="local|auto|ADDRESS",
                   help="serve on Ray Serve instead: 'local' starts Ray in this machine (token authentication on), "
                        "'auto' joins the running cluster, or a cluster address (docs/scale.md)")
    p.add_argument("--replicas", type=positive_int, default=1, help="model replicas (with --ray)")
    p.add_argument("--gpus-per-replica", type=non_negative_float, default=0.0,
                   help="GPUs per replica (with --ray; 1: one model or engine per GPU)")
    p.add_argument("--cpus-per-replica", type=positive_float, default=1.0, help="CPUs per replica (with --ray)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="most clips in one forward pass")
    p.add_argument("--batch-wait-ms", type=non_negative_float, default=5.0,
                   help="longest a batch waits for requests already arriving (an idle model runs a lone clip at "
                        "once)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting for the model before new ones get 503")
    p.add_argument("--max-upload-mb", type=positive_float, default=64.0, help="largest request body (413 above)")
    p.add_argument("--max-uploads", type=positive_int, default=32,
                   help="request bodies being read at once (503 above: slow uploads hold only these)")
    p.add_argument("--upload-timeout-s", type=positive_float, default=30.0,
                   help="time an upload may take to arrive, plus its size at 64 KiB/s (408 after)")
    p.add_argument("--decode-workers", type=positive_int, default=2, help="threads decoding uploads")
    p.add_argument("--timeout-s", type=positive_float, default=60.0,
                   help="longest a request waits for its answer once uploaded (504 after it)")
    p.add_argument("--model-name", default="stt", help="the model's name in the /v2 (KServe) routes")
    add_face_args(p)
    from stt_fast.serving.service import SERVE_LIMITS

    add_limit_args(p, SERVE_LIMITS)
    p.add_argument("--device", default=None, type=device_name,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
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


def options_from_args(args: argparse.Namespace):
    from stt_fast.predictors import ModelSpec
    from stt_fast.serving.service import ServeOptions, check_options

    spec = ModelSpec(backend_of(args), args.checkpoint, args.onnx, args.engine, args.device)
    if not Path(spec.file()).is_file():
        raise FileNotFoundError(f"model file not found: {spec.file()}")
    spec.config()  # a file that is not a model fails here, in one line, before anything starts
    options = ServeOptions(spec, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                           cpus_per_replica=args.cpus_per_replica, max_batch=args.max_batch,
                           batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                           max_upload_mb=args.max_upload_mb, request_timeout_s=args.timeout_s,
                           upload_timeout_s=args.upload_timeout_s, max_uploads=args.max_uploads,
                           decode_workers=args.decode_workers, detect_face=args.detect_face, no_face=args.no_face,
                           limits=limits_from_args(args), api_key=args.api_key or os.environ.get(API_KEY_VARIABLE),
                           model_name=args.model_name)
    check_options(options)
    return options


def run(args: argparse.Namespace) -> int:
    from stt_fast.serving.ports import check_port_free

    options = options_from_args(args)
    check_port_free(args.host, args.port)
    return _run_ray(args, options) if args.ray else _run_embedded(args, options)


def _ready_line(args, began: float, detail: str) -> None:
    url = f"http://{args.host}:{args.port}"
    key = " -H 'Authorization: Bearer $STT_FAST_API_KEY'" if args.api_key or os.environ.get(API_KEY_VARIABLE) else ""
    print(f"[serve] ready in {time.monotonic() - began:.0f} s ({detail}): POST {url}/v1/predict "
          f"(curl{key} -F file=@clip.mp4 {url}/v1/predict); {url}/v2/models/{args.model_name}/infer; {url}/metrics; "
          "Ctrl-C stops", file=sys.stderr, flush=True)


def _run_embedded(args, options) -> int:
    try:
        from stt_fast.serving.embedded import EmbeddedServer, load_model
    except ImportError as e:
        raise ImportError(f"stt-fast serve needs uvicorn and FastAPI: pip install 'stt-fast[serve]' ({e})") from None
    began = time.monotonic()
    print(f"[serve] loading the {options.spec.backend} backend ...", file=sys.stderr, flush=True)
    predictor, digest = load_model(options)
    server = EmbeddedServer(options, host=args.host, port=args.port, predictor=predictor, checkpoint_sha256=digest)
    thread = server.start_in_thread()
    _ready_line(args, began, f"{predictor.name}, one process")
    signal.signal(signal.SIGTERM, _interrupt)  # docker stop, systemd, kill: as Ctrl-C
    try:
        while thread.is_alive():
            thread.join(timeout=0.5)
    except KeyboardInterrupt:
        print("[serve] stopping", file=sys.stderr, flush=True)
    finally:
        server.stop(thread)
    return 0


def _run_ray(args, options) -> int:
    try:
        from stt_fast.serving.app import start, stop
    except ImportError as e:
        raise ImportError(f"stt-fast serve --ray needs Ray Serve: pip install 'stt-fast[serve]' ({e})") from None
    print(f"[serve] starting Ray and {args.replicas} replica(s) of the {options.spec.backend} backend "
          "(building each model takes a while)...", file=sys.stderr, flush=True)
    began = time.monotonic()
    started_ray = start(options, host=args.host, port=args.port, ray_address=args.ray)
    try:
        # SIGTERM (docker stop, systemd, kill) stops the service as Ctrl-C does: Serve and Ray shut down,
        # status 0. Set after Ray starts, whose own handler for it would abort the process.
        signal.signal(signal.SIGTERM, _interrupt)
        _ready_line(args, began, f"{args.replicas} Ray Serve replica(s)")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        stop(started_ray)
