"""`stt-fast serve --ray`: the service on Ray Serve, for clusters (the default is the embedded server,
embedded.py).

    client --HTTP--> Ray Serve proxy --> Replica x N (one deployment): the embedded service itself, each
                                         with its model, its DynamicBatcher and its admission (service.py)

One hop: each replica is what `stt-fast serve` runs in one process (the routes of api.py, the bounds of
service.py, one model behind a DynamicBatcher), and Serve's proxy spreads requests over the replicas (one
per GPU with --gpus-per-replica 1). A first design put the batching in a Gateway deployment calling a
Classifier deployment: two hops, and half the throughput of a one-deployment echo on this project's CPU
machine (benchmarks/results/*/serve). /readyz says whether every replica has built and checked its model.
"""

from __future__ import annotations

import logging
import re
import time

import torch
from ray import serve

from .api import make_api
from .service import ServeOptions, check_options

log = logging.getLogger(__name__)
APP_NAME = "stt_fast"
# Requests a replica takes beyond its capacity only to refuse them itself (503 with Retry-After, at the cost
# of reading their headers) before Serve's proxy starts refusing with its own plain-text 503.
ADMISSION_HEADROOM = 64
FAILED_STATES = ("UNHEALTHY", "DEPLOY_FAILED")  # a deployment's states that mean its replicas failed
DEPLOYMENT = "Replica"


def check_ray_options(options: ServeOptions) -> None:
    """check_options, and what only the Ray mode needs: a GPU per replica for a TensorRT engine."""
    check_options(options)
    if options.spec.backend == "tensorrt" and options.gpus_per_replica <= 0:
        raise ValueError("a TensorRT engine needs a GPU per replica: --gpus-per-replica 1")


def capacity(options: ServeOptions) -> int:
    """Requests one replica admits past their upload: what its model holds (a batch in its forward pass, the
    next gathering) plus max_queue waiting; the next one answers 503 at once."""
    return 2 * options.max_batch + options.max_queue


def deployment_limits(options: ServeOptions) -> dict[str, int]:
    """Serve's own bounds per replica (max_ongoing_requests / max_queued_requests), above what a replica's
    admission lets through (uploads being read count too), so that the 503s a client sees are the service's
    (with Retry-After) and Serve's queues stay bounded behind them all the same."""
    return {"max_ongoing_requests": capacity(options) + options.max_uploads + ADMISSION_HEADROOM,
            "max_queued_requests": options.max_queue + ADMISSION_HEADROOM}


def _state(value) -> str:
    """A Serve status enum's name ("HEALTHY"); they are str enums whose str() is "DeploymentStatus.HEALTHY"."""
    return str(getattr(value, "value", value))


def _app_status(app_name: str):
    """(the app's status, its deployment's status) from Serve; None for either not deployed."""
    app = serve.status().applications.get(app_name)
    return app, (app.deployments.get(DEPLOYMENT) if app else None)


class RayReadiness:
    """The embedded service's model, with readiness from Serve: every replica of the app running."""

    def __init__(self, model, options: ServeOptions, app_name: str) -> None:
        self.model, self.options, self.app_name = model, options, app_name
        self.capacity = model.capacity

    async def classify(self, clip: torch.Tensor) -> dict:
        return await self.model.classify(clip)

    async def facts(self) -> dict:
        return await self.model.facts()

    async def readiness(self) -> tuple[bool, dict]:
        _, deployment = _app_status(self.app_name)
        states = {_state(k): v for k, v in (deployment.replica_states if deployment else {}).items()}
        running = states.get("RUNNING", 0)
        ready = deployment is not None and _state(deployment.status) == "HEALTHY" and running >= self.options.replicas
        return ready, {"replicas_running": running, "replicas_wanted": self.options.replicas,
                       "status": _state(deployment.status) if deployment else "absent"}


api = make_api()


@serve.ingress(api)
class Replica:
    """One replica: the embedded service with its own model (built and checked by one probe clip here: a model
    that cannot run fails the replica, and /readyz stays 503 naming the failure)."""

    def __init__(self, options: ServeOptions, app_name: str = APP_NAME) -> None:
        from . import api as routes
        from .embedded import build_service, load_model

        if options.spec.device in (None, "cpu") and not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(options.cpus_per_replica)))  # replicas sharing a machine
        predictor, digest = load_model(options)
        service = build_service(options, predictor, digest)
        service.model = RayReadiness(service.model, options, app_name)
        routes.register(service)


def build_app(options: ServeOptions, app_name: str = APP_NAME):
    """The Serve application (replicas of the service) for options, not started."""
    check_ray_options(options)
    replica = serve.deployment(Replica).options(
        # a model that cannot be built fails its replicas the same way every time: give up after three
        name=DEPLOYMENT, num_replicas=options.replicas, health_check_period_s=2.0, max_constructor_retry_count=3,
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica},
        **deployment_limits(options))
    return replica.bind(options, app_name)


def failure_reason(message: str) -> str:
    """The line of a Ray failure message that says what failed: its last exception line ("CheckpointError:
    ..."), without the traceback above it or the terminal colours Ray puts in it."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).rstrip() for line in message.splitlines()]
    lines = [line for line in lines if line and not line[0].isspace()]
    return lines[-1] if lines else message.strip()


def _replica_failure(app_name: str) -> str | None:
    """Why the app's replicas failed to start, from Serve's status; None when it says nothing."""
    try:
        _, deployment = _app_status(app_name)
    except Exception:  # Serve itself is down: the caller's own error says more
        return None
    if deployment is None or _state(deployment.status) not in FAILED_STATES or not deployment.message:
        return None
    return failure_reason(deployment.message)


def wait_until_ready(app_name: str, replicas: int, timeout_s: float, poll_s: float = 0.5) -> None:
    """Block until the app's replicas are all running; RuntimeError naming the state after timeout_s
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

    check_ray_options(options)
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

