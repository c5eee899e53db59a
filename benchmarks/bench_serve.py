"""Load on `stt-fast serve` over loopback, in both modes (embedded: one process on uvicorn; ray: Ray Serve),
beside the floors measured in the same run: N concurrent clients, a bounded number of requests, each with a
timeout; p50/p99 latency, throughput, mean batch size (from the server's /metrics), answers by status.

Peers and floors, each measured in the same run:
- the same model called directly in this process (latency at batch 1, clips/s at batch 1 and --max-batch):
  what HTTP, decoding and batching add;
- uvicorn-echo: a plain FastAPI app on uvicorn that parses the same .npy upload and answers a constant (no
  model): what one process's HTTP costs, the embedded mode's floor;
- ray-serve-echo: the same as one Ray Serve deployment: the Ray mode's floor.

    python -m stt_fast.benchmarks.bench_serve [--configs tiny,paper] [--modes embedded,ray] [--replicas 1,2]
                                              [--concurrency 1,4,16] [--requests 64] [--kill-replica]
                                              [--output DIR]

Requests carry .npy clips (uint8 [T, 3, S, S], random), so that the figures are the service's, not a
video decoder's. Each server's answers are checked against the direct call on a few clips.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import functools
import io
import json
import socket
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .machine import machine_header, store_result
from .timing import measure, summarize


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)  # per request, in the order they were issued
    outcomes: list = field(default_factory=list)  # per request: the HTTP status, or "timeout" / "connection"
    answers: list[dict] = field(default_factory=list)  # JSON bodies of the 200s, by request index ("_index")
    refusals: list[dict] = field(default_factory=list)  # the others: {"status", "retry_after", "body"}
    batch_sizes: tuple[float, float] = (0.0, 0.0)  # (sum, count) of the server's batch-size histogram

    @property
    def statuses(self) -> Counter:
        return Counter(self.outcomes)

    def summary(self) -> dict:
        ok = [t for t, outcome in zip(self.latencies_ms, self.outcomes) if outcome == 200]
        timing = summarize(ok, 0) if ok else None
        return {"concurrency": self.concurrency, "requests": sum(self.statuses.values()),
                "ok": self.statuses.get(200, 0),
                "by_status": {str(k): v for k, v in sorted(self.statuses.items(), key=lambda kv: str(kv[0]))},
                "seconds": round(self.seconds, 3),
                "requests_per_second": round(self.statuses.get(200, 0) / self.seconds, 3) if self.seconds else 0.0,
                "p50_ms": round(timing.median_ms, 2) if timing else None,
                "p99_ms": round(timing.p99_ms, 2) if timing else None,
                # from the answers (each names the pass it rode in): /metrics is one replica's on Ray
                "mean_batch_size": round(sum(a["batch_size"] for a in self.answers) / len(self.answers), 3)
                if self.answers and all("batch_size" in a for a in self.answers) else None,
                "refused_because": dict(Counter(_reason(r) for r in self.refusals))}


def _reason(refusal: dict) -> str:
    """A refusal's status and the service's own reason ({"error": ...}), or its body's start."""
    try:
        reason = json.loads(refusal["body"])["error"]
    except (ValueError, KeyError, TypeError):
        reason = refusal["body"][:120]
    return f"{refusal['status']}: {reason}"


def npy_body(clip: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, clip)
    return buffer.getvalue()


def get(url: str, timeout_s: float = 10.0, headers: dict | None = None) -> tuple[int, str]:
    """(status, body) of a GET, any status."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout_s) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def batch_histogram(base_url: str, headers: dict | None = None) -> tuple[float, float]:
    from stt_fast.serving.metrics import read_metrics

    status, text = get(f"{base_url}/metrics", headers=headers)
    if status != 200:  # the floors have no metrics
        return 0.0, 0.0
    samples = read_metrics(text)
    return samples.get("stt_fast_batch_size_sum", 0.0), samples.get("stt_fast_batch_size_count", 0.0)


async def _load(url: str, bodies: list[tuple[bytes, str]], concurrency: int, total: int,
                timeout_s: float, headers: dict | None = None) -> tuple[list[float], list, list[dict], list[dict]]:
    import aiohttp

    latencies, statuses, answers, refusals = [0.0] * total, [None] * total, [], []
    counter = iter(range(total))

    async def client(session) -> None:
        for i in counter:  # shared: each request index taken by one client
            body, content_type = bodies[i % len(bodies)]
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers={"Content-Type": content_type} | (headers or {}),
                                        timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                    text = await response.read()
                    statuses[i] = response.status
                    if response.status == 200:
                        answers.append(json.loads(text) | {"_index": i})
                    else:
                        refusals.append({"status": response.status, "retry_after": response.headers.get("Retry-After"),
                                         "body": text.decode(errors="replace")})
            except asyncio.TimeoutError:
                statuses[i] = "timeout"
            except aiohttp.ClientError:
                statuses[i] = "connection"
            latencies[i] = (time.perf_counter() - started) * 1e3

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return latencies, statuses, answers, refusals


def run_load(base_url: str, bodies: list[tuple[bytes, str]], *, concurrency: int, requests: int,
             timeout_s: float = 60.0, route: str = "/v1/predict", headers: dict | None = None) -> LoadResult:
    """`requests` POSTs of bodies (cycled; (bytes, content type)) by `concurrency` clients; every request
    bounded by timeout_s, so the run ends within about requests / concurrency * timeout_s."""
    before = batch_histogram(base_url, headers)
    started = time.perf_counter()
    latencies, statuses, answers, refusals = asyncio.run(_load(base_url + route, bodies, concurrency, requests,
                                                               timeout_s, headers))
    seconds = time.perf_counter() - started
    after = batch_histogram(base_url, headers)
    return LoadResult(concurrency, seconds, latencies, statuses, sorted(answers, key=lambda a: a["_index"]), refusals,
                      (after[0] - before[0], after[1] - before[1]))


def kill_one_replica(app_name: str = "stt_fast") -> str:
    """Kill one of the app's replicas (Ray actor, no restart of that actor: Serve must start a new one); returns
    its actor name. RuntimeError when the app has no replica to kill."""
    import ray

    replicas = sorted((a for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["name"].startswith(f"SERVE_REPLICA::{app_name}#Replica#")), key=lambda a: a["name"])
    if not replicas:
        raise RuntimeError(f"no replica of {app_name!r} is running")
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    return replicas[0]["name"]


def wait_ready(base_url: str, timeout_s: float, poll_s: float = 0.5) -> float | None:
    """Seconds until GET /readyz answers 200, or None when it does not within timeout_s."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if get(f"{base_url}/readyz", timeout_s=5)[0] == 200:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(poll_s)
    return None


def run_load_killing_a_replica(base_url: str, bodies: list[tuple[bytes, str]], *, concurrency: int, requests: int,
                               kill_after_s: float = 1.0, timeout_s: float = 20.0, recover_timeout_s: float = 90.0,
                               app_name: str = "stt_fast", headers: dict | None = None
                               ) -> tuple[LoadResult, float | None]:
    """run_load with one replica killed kill_after_s into it: the load's answers by status (every
    request ends: 200, or a 5xx naming the failure, or its client timeout), and the seconds from the kill until
    the service is ready again (None: not within recover_timeout_s)."""
    import threading

    outcome: dict = {}
    load = threading.Thread(target=lambda: outcome.update(result=run_load(
        base_url, bodies, concurrency=concurrency, requests=requests, timeout_s=timeout_s, headers=headers)))
    load.start()
    time.sleep(kill_after_s)
    kill_one_replica(app_name)
    killed = time.monotonic()
    # Serve notices the dead replica at its next health check (every 2 s): until then /readyz still says
    # ready, so wait for it to say otherwise before timing the recovery.
    noticed_by = time.monotonic() + 10.0
    while time.monotonic() < noticed_by and get(f"{base_url}/readyz", timeout_s=5)[0] == 200:
        time.sleep(0.2)
    recovered = wait_ready(base_url, recover_timeout_s)
    load.join(timeout=requests * timeout_s)
    if "result" not in outcome:
        raise RuntimeError("the load run did not end")
    return outcome["result"], None if recovered is None else round(time.monotonic() - killed, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _direct(predictor, clips: torch.Tensor, batch: int, rounds: int = 3) -> float:
    """clips/s of the predictor called in this process, `batch` clips a call (the best of `rounds` passes
    over the clips, after one untimed pass)."""
    def one_pass() -> None:
        for start in range(0, len(clips), batch):
            predictor(clips[start:start + batch])

    timing = measure(one_pass, "cpu", warmup=1, min_runs=rounds, max_runs=rounds, min_seconds=0.0)
    return len(clips) / (timing.min_ms / 1e3)


class _Uvicorn:
    """An ASGI app on uvicorn in a thread of this process (the floor)."""

    def __init__(self, app, port: int) -> None:
        import threading

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _ray_echo(num_frames: int, image_size: int, port: int) -> None:
    """The Ray mode's floor: the echo as one Ray Serve deployment (Ray and Serve started by the caller's start())."""
    from ray import serve

    from .echo_app import echo_api

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    @serve.ingress(echo_api(num_frames, image_size))
    class Echo:
        pass

    serve.run(Echo.bind(), name="echo", route_prefix="/echo", blocking=False)


def run(configs=("tiny", "paper"), modes=("embedded", "ray"), replicas=(1, 2), concurrencies=(1, 4, 16),
        requests: int = 64, backend: str = "compiled", max_batch: int = 8, batch_wait_ms: float = 5.0,
        output_dir=None, kill_replica: bool = False, progress: bool = True) -> tuple[dict, Path | None]:
    """Every (config, mode, replicas, concurrency) row beside the floors at the same concurrency; kill_replica
    adds, to each Ray run of 2 replicas or more, one run at the largest concurrency, about 8 s long, with a
    replica killed a second into it (its answers by status, and how long the service took to be ready again)."""
    from stt_fast.checkpoint import save_checkpoint
    from stt_fast.config import get_config
    from stt_fast.model import STT
    from stt_fast.predict import class_names, probabilities
    from stt_fast.predictors import ModelSpec, load_predictor
    from stt_fast.serving.embedded import EmbeddedServer
    from stt_fast.serving.service import ServeOptions

    from .echo_app import echo_api

    rows, floors, peers, checks = [], [], [], []

    def measure_server(base: str, label: dict, bodies, want) -> None:
        served = run_load(base, bodies[:4], concurrency=1, requests=4)
        gap = max(abs(a["probabilities"][k] - w["probabilities"][k])
                  for a, w in zip(served.answers, want) for k in w["probabilities"])
        checks.append(label | {"max_abs_probability_difference": gap})
        run_load(base, bodies, concurrency=max(concurrencies), requests=max(concurrencies))  # warm-up
        for concurrency in concurrencies:
            result = run_load(base, bodies, concurrency=concurrency, requests=requests)
            row = label | {"backend": backend, "max_batch": max_batch, "batch_wait_ms": batch_wait_ms,
                           **result.summary()}
            rows.append(row)
            if progress:
                print(f"[bench serve] {label}, {concurrency} clients: {row['requests_per_second']:.2f} req/s, p50 "
                      f"{row['p50_ms']} ms, p99 {row['p99_ms']} ms, mean batch {row['mean_batch_size']}, "
                      f"{row['by_status']}")

    def measure_floor(base: str, name: str, config_name: str, bodies) -> None:
        run_load(base, bodies, concurrency=max(concurrencies), requests=max(concurrencies))
        for concurrency in concurrencies:
            result = run_load(base, bodies, concurrency=concurrency, requests=requests)
            floors.append({"config": config_name, "floor": name, **result.summary()})
            if progress:
                print(f"[bench serve] floor {name}, {concurrency} clients: "
                      f"{floors[-1]['requests_per_second']:.2f} req/s, p50 {floors[-1]['p50_ms']} ms")

    with tempfile.TemporaryDirectory(prefix="stt_fast-bench-serve-") as folder:
        for name in configs:
            config = get_config(name)
            torch.manual_seed(0)
            checkpoint = save_checkpoint(STT(config).eval(), Path(folder) / f"{name}.safetensors")
            rng = np.random.default_rng(0)
            clips = rng.integers(0, 256, (16, config.num_frames, 3, config.image_size, config.image_size),
                                 dtype=np.uint8)
            bodies = [(npy_body(c), "application/x-npy") for c in clips]
            direct = load_predictor(backend, checkpoint=checkpoint, device="cpu")
            floats = torch.from_numpy(clips).float() / 255
            one = measure(functools.partial(direct, floats[:1]), "cpu", warmup=2, min_runs=10, min_seconds=0.5)
            peers.append({"config": name, "backend": direct.name, "latency_ms_batch_1": round(one.median_ms, 3),
                          "clips_per_second_batch_1": round(_direct(direct, floats, 1), 3),
                          f"clips_per_second_batch_{max_batch}": round(_direct(direct, floats, max_batch), 3)})
            want = probabilities(direct(floats[:4]), class_names(config.num_classes))
            spec = ModelSpec(backend, str(checkpoint), None, None, "cpu")
            options = ServeOptions(spec, cpus_per_replica=1.0, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                                   max_queue=max(64, 2 * max(concurrencies)))
            echo = _Uvicorn(echo_api(config.num_frames, config.image_size), port := free_port())
            try:
                measure_floor(f"http://127.0.0.1:{port}", "uvicorn-echo", name, bodies)
            finally:
                echo.stop()
            if "embedded" in modes:
                server = EmbeddedServer(options, port=(port := free_port()), predictor=direct,
                                        checkpoint_sha256=None)
                thread = server.start_in_thread()
                try:
                    measure_server(f"http://127.0.0.1:{port}", {"config": name, "mode": "embedded", "replicas": 1},
                                   bodies, want)
                finally:
                    server.stop(thread)
            del direct
            if "ray" in modes:
                from stt_fast.serving.app import start, stop

                for count in replicas:
                    port = free_port()
                    began = time.perf_counter()
                    started_ray = start(dataclasses.replace(options, replicas=count), port=port)
                    ready_s = time.perf_counter() - began
                    base = f"http://127.0.0.1:{port}"
                    try:
                        if count == replicas[0]:
                            _ray_echo(config.num_frames, config.image_size, port)
                            measure_floor(f"{base}/echo", "ray-serve-echo", name, bodies)  # its /v1/predict
                        label = {"config": name, "mode": "ray", "replicas": count, "ready_seconds": round(ready_s, 1)}
                        measure_server(base, label, bodies, want)
                        if kill_replica and count >= 2:
                            # enough requests to last about 8 s at the rate just measured: the kill (at 1 s) and
                            # the recovery (seconds) fall inside the run
                            fault_requests = max(requests, int(8 * rows[-1]["requests_per_second"]))
                            result, recovered = run_load_killing_a_replica(base, bodies,
                                                                           concurrency=max(concurrencies),
                                                                           requests=fault_requests)
                            rows.append(label | {"backend": backend, "max_batch": max_batch,
                                                 "batch_wait_ms": batch_wait_ms, **result.summary(),
                                                 "fault": "one replica killed 1 s into the run",
                                                 "ready_again_seconds": recovered})
                            if progress:
                                print(f"[bench serve] {name}, {count} replicas, one killed: "
                                      f"{rows[-1]['by_status']}, ready again after {recovered} s")
                    finally:
                        stop(started_ray)
    for row in rows:
        floor = next((f for f in floors if f["config"] == row["config"] and f["concurrency"] == row["concurrency"]
                      and f["floor"] == ("uvicorn-echo" if row["mode"] == "embedded" else "ray-serve-echo")), None)
        peer = next(p for p in peers if p["config"] == row["config"])
        if floor and floor["requests_per_second"] and "fault" not in row:
            row["of_floor_throughput"] = round(row["requests_per_second"] / floor["requests_per_second"], 3)
        if row["p50_ms"] is not None:
            row["p50_over_direct_call_ms"] = round(row["p50_ms"] - peer["latency_ms_batch_1"], 2)
    result = {"schema": 2, "benchmark": "serve",
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_header(torch.device("cpu")), "rows": rows, "floors": floors, "direct_call": peers,
              "same_numbers": checks, "requests_per_run": requests,
              "note": "loopback HTTP, .npy clips; embedded = stt-fast serve (uvicorn, the model in the process); "
                      "ray = stt-fast serve --ray local; floors: uvicorn-echo and ray-serve-echo, no model"}
    path = store_result(result, output_dir, "serve", name="serve") if output_dir is not None else None
    return result, path


def markdown(result: dict) -> str:
    lines = ["| config | mode | replicas | clients | req/s | of the floor | p50 ms | p50 - direct call | p99 ms | "
             "mean batch | answers |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        fault = f" ({r['fault']}; ready again after {r['ready_again_seconds']} s)" if r.get("fault") else ""
        share = f"{100 * r['of_floor_throughput']:.0f}%" if "of_floor_throughput" in r else ""
        lines.append(f"| {r['config']} | {r['mode']} | {r['replicas']} | {r['concurrency']} | "
                     f"{r['requests_per_second']:.2f} | {share} | {r['p50_ms']} | "
                     f"{r.get('p50_over_direct_call_ms', '')} | {r['p99_ms']} | {r['mean_batch_size']} | "
                     f"{', '.join(f'{k}: {v}' for k, v in r['by_status'].items())}{fault} |")
    lines += ["", "| config | floor | clients | req/s | p50 ms |", "|---|---|---:|---:|---:|"]
    for f in result.get("floors", []):
        lines.append(f"| {f['config']} | {f['floor']} | {f['concurrency']} | {f['requests_per_second']:.2f} | "
                     f"{f['p50_ms']} |")
    lines += ["", "| config | direct call | latency ms, batch 1 | clips/s batch 1 | clips/s batched |",
              "|---|---|---:|---:|---:|"]
    for p in result["direct_call"]:
        batched = next(v for k, v in p.items() if k.startswith("clips_per_second_batch_") and not k.endswith("_1"))
        lines.append(f"| {p['config']} | {p['backend']} | {p.get('latency_ms_batch_1', '')} | "
                     f"{p['clips_per_second_batch_1']:.2f} | {batched:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,paper")
    parser.add_argument("--modes", default="embedded,ray")
    parser.add_argument("--replicas", default="1,2", help="Ray replicas")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--backend", default="compiled", choices=("reference", "compiled"))
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--kill-replica", action="store_true",
                        help="with 2 replicas or more: one more run at the largest concurrency, killing a replica "
                             "in it")
    parser.add_argument("--output", default="results", help="results folder (the project's: benchmarks/results)")
    args = parser.parse_args(argv)
    result, path = run(args.configs.split(","), args.modes.split(","), [int(v) for v in args.replicas.split(",")],
                       [int(v) for v in args.concurrency.split(",")], args.requests, args.backend, args.max_batch,
                       output_dir=args.output, kill_replica=args.kill_replica)
    print(markdown(result))
    if path:
        print(f"[bench serve] written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
