"""`stt-fast serve`: the model behind HTTP on Ray Serve, two deployments.

    client --HTTP--> Ray Serve proxy --> Gateway (FastAPI; reads, bounds and decodes uploads; @serve.batch)
                                            |  one DeploymentHandle call per batch of clips
                                            v
                                         Classifier x N replicas (one model each: one forward pass a call)

The Gateway decodes each upload on a thread, outside the batched call, so that a slow upload or decode
never holds a batch; its @serve.batch gathers the decoded clips of concurrent requests into batches of
up to max_batch clips (waiting at most batch_wait_ms for one to fill), two batches per replica in flight,
and each batch is one call to a Classifier replica: one forward pass. The batching sits in the Gateway,
where every request is, rather than in each replica: Serve's router sends a replica a call only after
asking it for its queue length, and a replica busy with a forward pass on a small machine answers
late, so clips sent one by one reached it one by one (measured: batches of 1.1 under 8 clients, against
7 for calls already waiting). Requests are admitted up to capacity() and refused with 503 and
Retry-After beyond it; Serve's own queues behind the Gateway are bounded too (max_queued_requests).
Each request waits at most request_timeout_s for its answer (504 after it).

Routes: POST /v1/predict, GET /healthz (the process is up), GET /readyz (every Classifier replica has
built and checked its model), GET /metrics (Prometheus text, metrics.py). Any other route: 404.
No request ever gets a traceback: an unexpected failure answers 500 with one line.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' parameter annotations as types.
import asyncio
import logging
import re
import socket
import time
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from stt_fast.predictors import ModelSpec

from .metrics import ServiceMetrics
from .uploads import UploadError, check_declared_size, clip_from_npy, clip_from_video, parse_upload

log = logging.getLogger(__name__)
APP_NAME = "stt_fast"
# Requests the Gateway takes beyond its capacity only to refuse them itself (503 with Retry-After, at the
# cost of reading their headers) before Serve's proxy starts refusing with its own plain-text 503.
ADMISSION_HEADROOM = 64
FAILED_STATES = ("UNHEALTHY", "DEPLOY_FAILED")  # a Classifier deployment's states that mean its replicas failed
ROUTES = ("POST /v1/predict", "GET /healthz", "GET /readyz", "GET /metrics")


@dataclass(frozen=True)
class ServeOptions:
    """What `stt-fast serve` sets; checked by check_options before anything starts."""

    spec: ModelSpec
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_batch: int = 16
    batch_wait_ms: float = 10.0
    max_queue: int = 64
    max_upload_mb: float = 64.0
    request_timeout_s: float = 60.0

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


def check_options(options: ServeOptions) -> None:
    """ValueError naming the first option out of range."""
    rules = [("replicas", options.replicas >= 1, "at least 1"), ("max_batch", options.max_batch >= 1, "at least 1"),
             ("max_queue", options.max_queue >= 1, "at least 1"),
             ("batch_wait_ms", 0 <= options.batch_wait_ms <= 10_000, "in [0, 10000]"),
             ("max_upload_mb", options.max_upload_mb > 0, "positive"),
             ("gpus_per_replica", options.gpus_per_replica >= 0, ">= 0"),
             ("cpus_per_replica", options.cpus_per_replica > 0, "positive"),
             ("request_timeout_s", options.request_timeout_s > 0, "positive")]
    for name, ok, expected in rules:
        if not ok:
            raise ValueError(f"{name} must be {expected}, got {getattr(options, name)!r}")
    if options.spec.backend == "tensorrt" and options.gpus_per_replica <= 0:
        raise ValueError("a TensorRT engine needs a GPU per replica: --gpus-per-replica 1")


def capacity(options: ServeOptions) -> int:
    """Requests the Gateway admits at once: what the Classifier replicas hold (two batches each: one in its
    forward pass, the next on its way) plus max_queue waiting. Request capacity + 1 answers 503 at once,
    before its body is read."""
    return options.replicas * 2 * options.max_batch + options.max_queue


def deployment_limits(options: ServeOptions) -> dict[str, dict[str, int]]:
    """Serve's own bounds per deployment (max_ongoing_requests / max_queued_requests), set above what the
    Gateway's admission lets through, so that the 503s a client sees are the Gateway's (with Retry-After)
    and Serve's queues stay bounded behind them all the same."""
    classifier = {"max_ongoing_requests": 2, "max_queued_requests": options.max_queue}  # calls: batches
    # Serve counts a request as queued while its router picks a replica, even one with room: a burst of
    # arrivals waits there for a moment, so the Gateway's queue takes a burst as large as its headroom.
    gateway = {"max_ongoing_requests": capacity(options) + ADMISSION_HEADROOM,
               "max_queued_requests": options.max_queue + ADMISSION_HEADROOM}
    return {"Classifier": classifier, "Gateway": gateway}


class Classifier:
    """One model per replica (stt_fast.predictors, the backend of `stt-fast predict`): a batch of clips a
    call, one forward pass."""

    def __init__(self, spec: ModelSpec, cpu_threads: int) -> None:
        from stt_fast.predict import class_names

        if spec.device in (None, "cpu") and not torch.cuda.is_available():
            torch.set_num_threads(max(1, cpu_threads))  # replicas sharing a machine do not oversubscribe it
        self.predictor = spec.load()
        config = self.predictor.config
        self.labels = class_names(config.num_classes)
        self.facts = {"backend": self.predictor.name, "checkpoint_sha256": _model_sha256(spec),
                      "num_frames": config.num_frames, "image_size": config.image_size}
        # The replica is ready once its model has answered: a model that cannot run fails here, and the
        # replica never takes a request (GET /readyz stays 503, naming the failure in Ray's log).
        probe = self.predictor(torch.rand(1, config.num_frames, 3, config.image_size, config.image_size))
        if probe.shape != (1, config.num_classes) or not torch.isfinite(probe).all():
            raise RuntimeError(f"the model's probe answer is {list(probe.shape)} with non-finite values")

    def describe(self) -> dict:
        return self.facts

    async def classify(self, clips: list[torch.Tensor]) -> list[dict]:
        """clips, each float32 [T, 3, S, S] -> one {"label", "probabilities", "batch_size"} per clip."""
        from stt_fast.predict import probabilities

        # the forward pass on a thread: the replica keeps answering Serve (health, queue length) meanwhile
        logits = await asyncio.to_thread(self.predictor, torch.stack(clips))
        return [row | {"batch_size": len(clips)} for row in probabilities(logits, self.labels)]


def _model_sha256(spec: ModelSpec) -> str | None:
    """The hash the answers carry: the model file's, or for an engine the checkpoint's, from its sidecar."""
    from stt_fast.files import sha256_file

    if spec.backend == "tensorrt":
        from stt_fast.export.engine_runtime import read_sidecar

        return read_sidecar(spec.engine).get("checkpoint_sha256")
    return sha256_file(spec.file())


api = FastAPI(title="stt_fast", docs_url=None, redoc_url=None, openapi_url=None)


def _error(status: int, reason: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers or None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        return _error(404, f"no route {request.method} {request.url.path}; this service has {', '.join(ROUTES)}")
    if exc.status_code == 405:
        return _error(405, f"{request.method} is not allowed on {request.url.path}; this service has "
                           f"{', '.join(ROUTES)}")
    return _error(exc.status_code, str(exc.detail))


def _state(value) -> str:
    """A Serve status enum's name ("HEALTHY"); they are str enums whose str() is "DeploymentStatus.HEALTHY"."""
    return str(getattr(value, "value", value))


@api.exception_handler(RequestValidationError)
async def _bad_parameters(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
    return _error(400, f"bad request parameters: {problems}")


def _is_replica_failure(error: BaseException) -> bool:
    """A Classifier replica that died or became unreachable under a request (Ray's actor errors)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(error, (ActorDiedError, ActorUnavailableError, RayActorError))


def _app_status(app_name: str):
    """(the app's status, its Classifier deployment's status) from Serve; None for either not deployed.
    Defined above the Gateway: @serve.ingress pickles the routes, and what they call, where it is applied."""
    app = serve.status().applications.get(app_name)
    return app, (app.deployments.get("Classifier") if app else None)


@serve.ingress(api)
class Gateway:
    def __init__(self, classifier, options: ServeOptions, app_name: str = APP_NAME) -> None:
        self.classifier, self.options, self.app_name = classifier, options, app_name
        self.metrics = ServiceMetrics()
        self.facts: dict | None = None
        self.capacity, self.in_flight = capacity(options), 0

        async def classify_batch(clips: list[torch.Tensor]) -> list[dict]:
            return await self.classifier.classify.remote(clips)

        # options known only now, hence the decorator applied here rather than on a method
        self.classify = serve.batch(max_batch_size=options.max_batch,
                                    batch_wait_timeout_s=options.batch_wait_ms / 1000,
                                    max_concurrent_batches=2 * options.replicas)(classify_batch)

    async def _facts(self) -> dict:
        if self.facts is None:
            self.facts = await self.classifier.describe.remote()
        return self.facts

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        _, deployment = await asyncio.to_thread(_app_status, self.app_name)
        states = {_state(k): v for k, v in (deployment.replica_states if deployment else {}).items()}
        running = states.get("RUNNING", 0)
        ready = deployment is not None and _state(deployment.status) == "HEALTHY" and running >= self.options.replicas
        body = {"ready": ready, "replicas_running": running, "replicas_wanted": self.options.replicas,
                "status": _state(deployment.status) if deployment else "absent"}
        return JSONResponse(body, status_code=200 if ready else 503)

    @api.get("/metrics")
    async def metrics(self) -> Response:
        return Response(self.metrics.text(), media_type="text/plain; version=0.0.4")

    @api.post("/v1/predict")
    async def predict(self, request: Request, detect_face: bool = False, filename: str | None = None):
        started = time.perf_counter()
        if self.in_flight >= self.capacity:  # admission, before the body is read: overload costs nothing
            self.metrics.answered(503, time.perf_counter() - started)
            return self._overloaded()
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        status, batch = 500, None
        try:
            answer = await asyncio.wait_for(self._predict(request, detect_face, filename),
                                            timeout=self.options.request_timeout_s)
            status, batch = 200, answer["batch_size"]
            return answer
        except UploadError as e:
            status = e.status
            return _error(e.status, e.reason)
        except asyncio.TimeoutError:
            status = 504
            return _error(504, f"no answer within {self.options.request_timeout_s:g} s (the service is overloaded "
                               "or a model replica is restarting)", **{"Retry-After": "5"})
        except Exception as e:
            from ray.serve.exceptions import BackPressureError

            if isinstance(e, BackPressureError):
                status = 503
                return self._overloaded()
            if _is_replica_failure(e):
                status = 503
                return _error(503, "the model replica serving this request failed; Ray is restarting it: retry",
                              **{"Retry-After": "2"})
            log.exception("stt_fast serve: request failed")
            return _error(500, f"internal error: {type(e).__name__}: {e}")
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)
            self.metrics.answered(status, time.perf_counter() - started, batch)

    def _overloaded(self) -> JSONResponse:
        return _error(503, f"the service is at capacity ({self.capacity} requests in progress or waiting); retry "
                           "after a moment", **{"Retry-After": "1"})

    async def _predict(self, request: Request, detect_face: bool, filename: str | None) -> dict:
        limit = self.options.max_upload_bytes
        check_declared_size(request.headers.get("content-length"), limit)
        body = bytearray()
        async for chunk in request.stream():  # bounded while read: a body without a length cannot grow past it
            body += chunk
            if len(body) > limit:
                raise UploadError(413, f"the upload is over {limit / 2**20:.1f} MiB, this server's limit "
                                       "(--max-upload-mb)")
        upload = parse_upload(bytes(body), request.headers.get("content-type"), filename)
        facts = await self._facts()
        frames, size = facts["num_frames"], facts["image_size"]
        if upload.kind == "npy":
            clip, warnings = clip_from_npy(upload.data, frames, size), []
        else:
            from stt_fast.data.pipeline import ClipPipeline

            pipeline = ClipPipeline(frames, size, detect_face=detect_face, no_face="full")
            clip, warnings = await asyncio.to_thread(clip_from_video, upload.data, upload.suffix, pipeline)
        row = await self.classify(clip)
        return {"label": row["label"], "probabilities": row["probabilities"], "warnings": warnings,
                "backend": facts["backend"], "checkpoint_sha256": facts["checkpoint_sha256"],
                "batch_size": row["batch_size"]}


def build_app(options: ServeOptions, app_name: str = APP_NAME):
    """The Serve application (Gateway over Classifier replicas) for options, not started."""
    check_options(options)
    limits = deployment_limits(options)
    classifier = serve.deployment(Classifier).options(
        # a model that cannot be built fails its replicas the same way every time: give up after three
        name="Classifier", num_replicas=options.replicas, health_check_period_s=2.0, max_constructor_retry_count=3,
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica},
        **limits["Classifier"])
    gateway = serve.deployment(Gateway).options(name="Gateway", num_replicas=1, ray_actor_options={"num_cpus": 0},
                                                **limits["Gateway"])
    bound = classifier.bind(options.spec, max(1, int(options.cpus_per_replica)))
    return gateway.bind(bound, options, app_name)


def check_port_free(host: str, port: int) -> None:
    """OSError-free check, before Ray starts: ValueError when host:port cannot be bound here."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server there? --port)") \
                from None


def failure_reason(message: str) -> str:
    """The line of a Ray failure message that says what failed: its last exception line ("CheckpointError:
    ..."), without the traceback above it or the terminal colours Ray puts in it."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).rstrip() for line in message.splitlines()]
    lines = [line for line in lines if line and not line[0].isspace()]
    return lines[-1] if lines else message.strip()


def _replica_failure(app_name: str) -> str | None:
    """Why the app's Classifier replicas failed to start, from Serve's status; None when it says nothing."""
    try:
        _, deployment = _app_status(app_name)
    except Exception:  # Serve itself is down: the caller's own error says more
        return None
    if deployment is None or _state(deployment.status) not in FAILED_STATES or not deployment.message:
        return None
    return failure_reason(deployment.message)


def wait_until_ready(app_name: str, replicas: int, timeout_s: float, poll_s: float = 0.5) -> None:
    """Block until the app's Classifier replicas are all running; RuntimeError naming the state after timeout_s
    (a model that fails to build keeps its deployment unhealthy: Ray's message is quoted)."""
    deadline = time.monotonic() + timeout_s
    last = "not deployed yet"
    while time.monotonic() < deadline:
        app, deployment = _app_status(app_name)
        if deployment is not None:
            last = f"{_state(deployment.status)}: {failure_reason(deployment.message or '')}".strip(": ")
            if _state(deployment.status) == "HEALTHY":
                return
            if _state(deployment.status) in FAILED_STATES:
                raise RuntimeError(f"the model replicas failed to start: {last}")
        if app is not None and _state(app.status) == "DEPLOY_FAILED":
            raise RuntimeError(f"the application failed to deploy: {app.message}")
        time.sleep(poll_s)
    raise RuntimeError(f"the model replicas were not ready after {timeout_s:g} s ({last})")


def start(options: ServeOptions, *, host: str = "127.0.0.1", port: int = 8000, ray_address: str = "local",
          ready_timeout_s: float = 600.0, app_name: str = APP_NAME, route_prefix: str = "/") -> bool:
    """Start (or join) Ray, Serve's HTTP proxy on host:port and the app, and wait until it is ready.
    Returns whether Ray was started here (stop() then shuts it down)."""
    from stt_fast.ray_cluster import connect_ray

    check_options(options)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines say what [serve] says already
    started_ray = connect_ray(ray_address, cpus_needed=options.replicas * options.cpus_per_replica + 1)
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        serve.run(build_app(options, app_name), name=app_name, route_prefix=route_prefix, blocking=False)
        wait_until_ready(app_name, options.replicas, ready_timeout_s)
    except BaseException as e:
        reason = _replica_failure(app_name) if isinstance(e, RuntimeError) else None
        stop(started_ray)
        if reason:
            raise RuntimeError(f"the model replicas failed to start: {reason}") from None
        raise
    return started_ray


def stop(started_ray: bool) -> None:
    """Shut Serve down (every app and the proxy), and Ray where start() started it."""
    import ray

    try:
        serve.shutdown()
    finally:
        if started_ray:
            ray.shutdown()

