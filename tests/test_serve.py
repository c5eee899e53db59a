"""`stt-fast serve` on loopback: what a request may carry, the service's bounds, and a real Ray Serve
instance (two apps: the service, and a tightly bounded one for overload) answering as `predict` does,
batching concurrent requests, refusing what it must, surviving a killed replica, and stopping cleanly.
Every request loop is bounded in count and time."""

import io
import json
import re
import threading
import time

import numpy as np
import pytest
import torch

from stt_fast import get_config
from stt_fast.checkpoint import save_checkpoint
from stt_fast.data.synthetic import write_long_video
from stt_fast.predict import class_names
from stt_fast.predictors import ModelSpec
from stt_fast.serving.metrics import ServiceMetrics, read_metrics
from stt_fast.serving.uploads import UploadError, check_declared_size, clip_from_npy, parse_upload
from tests.helpers import trained_looking

TINY = get_config("tiny")  # T = 4 frames of 64 x 64
TINY_LABELS = class_names(TINY.num_classes)
BOUNDARY = "stt-fast-test-boundary"


def _multipart(filename: str, data: bytes, field: str = "file") -> tuple[bytes, str]:
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    return body, f"multipart/form-data; boundary={BOUNDARY}"


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# --- what a request carries (no server) -------------------------------------------------------------------

def test_uploads_by_multipart_field_and_by_content_type():
    video = b"\x00\x00\x00\x18ftypmp42 (bytes of a video file)"
    body, content_type = _multipart("face.MOV", video)
    assert parse_upload(body, content_type) == parse_upload(video, "video/quicktime", "face.mov")
    assert parse_upload(body, content_type).suffix == ".mov" and parse_upload(body, content_type).data == video
    body, content_type = _multipart("clip.npy", b"NUMPY")
    assert parse_upload(body, content_type).kind == "npy"
    assert parse_upload(b"NUMPY", "application/x-npy").kind == "npy"
    assert parse_upload(video, "application/octet-stream").suffix == ".mp4"  # no name: the default


@pytest.mark.parametrize("body,content_type,message", [
    (b"", "video/mp4", "empty request body"),
    (_multipart("a.mp4", b"xx", field="video")[0], f"multipart/form-data; boundary={BOUNDARY}", "without a 'file'"),
    (_multipart("a.mp4", b"")[0], f"multipart/form-data; boundary={BOUNDARY}", "'file' field is empty"),
], ids=["empty", "no-file-field", "empty-file"])
def test_bad_uploads_are_400_naming_what_is_missing(body, content_type, message):
    with pytest.raises(UploadError, match=message) as caught:
        parse_upload(body, content_type)
    assert caught.value.status == 400


def test_an_npy_clip_is_the_models_input_exactly():
    clip = np.random.default_rng(0).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
    got = clip_from_npy(_npy(clip), 4, 64)
    assert got.dtype == torch.float32 and torch.equal(got * 255, torch.from_numpy(clip).float())
    for wrong in (clip.astype(np.float32), clip[:3], clip[:, :, :32]):
        with pytest.raises(UploadError, match=r"must be uint8 \[4, 3, 64, 64\]") as caught:
            clip_from_npy(_npy(wrong), 4, 64)
        assert caught.value.status == 400
    with pytest.raises(UploadError, match=r"not a \.npy array"):
        clip_from_npy(b"not numpy", 4, 64)


@pytest.mark.parametrize("declared,status", [("1048577", 413), ("1048576", None), (None, None), ("ten", 400)])
def test_the_declared_size_is_checked_before_the_body_is_read(declared, status):
    if status is None:
        check_declared_size(declared, 2**20)
        return
    with pytest.raises(UploadError) as caught:
        check_declared_size(declared, 2**20)
    assert caught.value.status == status


def test_capacity_and_serve_limits():
    pytest.importorskip("ray.serve", reason="Ray Serve is the serve extra (the dev extra installs it)")
    from stt_fast.serving.app import ServeOptions, capacity, check_options, deployment_limits

    spec = ModelSpec("reference", "m.safetensors", None, None, "cpu")
    options = ServeOptions(spec, replicas=3, max_batch=8, max_queue=10)
    assert capacity(options) == 3 * 2 * 8 + 10  # two batches per replica, then the queue
    limits = deployment_limits(options)
    assert limits["Classifier"] == {"max_ongoing_requests": 2, "max_queued_requests": 10}  # batches
    assert limits["Gateway"] == {"max_ongoing_requests": 58 + 64, "max_queued_requests": 10 + 64}
    for bad, message in [({"replicas": 0}, "replicas"), ({"max_batch": 0}, "max_batch"),
                         ({"batch_wait_ms": -1}, "batch_wait_ms"), ({"max_upload_mb": 0}, "max_upload_mb")]:
        with pytest.raises(ValueError, match=message):
            check_options(ServeOptions(spec, **bad))
    with pytest.raises(ValueError, match="gpus-per-replica"):
        check_options(ServeOptions(ModelSpec("tensorrt", None, None, "m.engine", None)))


def test_metrics_text_counts_requests_latency_and_batches():
    metrics = ServiceMetrics()
    metrics.answered(200, 0.02, batch_size=3)
    metrics.answered(200, 0.2, batch_size=1)
    metrics.answered(503, 0.001)
    samples = read_metrics(metrics.text().decode())
    assert samples['stt_fast_requests_total{status="200"}'] == 2
    assert samples['stt_fast_requests_total{status="503"}'] == 1
    assert samples["stt_fast_batch_size_sum"] == 4 and samples["stt_fast_batch_size_count"] == 2
    assert samples['stt_fast_request_seconds_bucket{le="0.025"}'] == 2
    assert samples["stt_fast_request_seconds_count"] == 3


def test_the_backend_follows_the_model_file():
    import argparse

    from stt_fast.cli.serve import backend_of

    def args(**given):
        return argparse.Namespace(**({"backend": None, "checkpoint": None, "onnx": None, "engine": None} | given))

    assert backend_of(args(checkpoint="m.safetensors")) == "compiled"
    assert backend_of(args(engine="m.engine")) == "tensorrt" and backend_of(args(onnx="m.onnx")) == "onnx"
    assert backend_of(args(checkpoint="m.safetensors", backend="reference")) == "reference"
    with pytest.raises(ValueError, match="runs --checkpoint"):
        backend_of(args(onnx="m.onnx", backend="compiled"))


@pytest.mark.parametrize("message,reason", [
    ("The deployment failed to start 3 times in a row. Error:\n\x1b[36mray::ServeReplica:stt_fast:Classifier()\x1b[39m"
     " (pid=1)\n  File \"replica.py\", line 3, in init\n    raise X\nRuntimeError: Traceback (most recent call last):"
     "\n  File \"checkpoint.py\", line 62\nstt_fast.checkpoint.CheckpointError: m.safetensors is not readable\n",
     "stt_fast.checkpoint.CheckpointError: m.safetensors is not readable"),
    ("replica died unexpectedly", "replica died unexpectedly"),
    ("  only indented\n", "only indented"),
    ("", ""),
], ids=["ray-traceback", "one-line", "indented-only", "empty"])
def test_a_replica_failure_is_reported_by_its_last_exception_line(message, reason):
    from stt_fast.serving.app import failure_reason

    assert failure_reason(message) == reason


def test_cli_serve_refuses_a_file_that_is_not_a_model_before_ray_starts(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    result = subprocess.run([sys.executable, "-m", "stt_fast", "serve", "--checkpoint", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stt-fast serve: error: {bad} is not a readable stt_fast "
                                                   "checkpoint"), result.stderr


def test_cli_serve_answers_then_stops_cleanly_on_sigterm(tmp_path):
    """The command as a user starts it: ready, one answer, then SIGTERM (docker stop, systemd): status 0,
    Serve and Ray shut down, nothing listens on the port any more."""
    import signal
    import subprocess
    import sys

    from stt_fast.benchmarks.bench_serve import free_port, get

    checkpoint = save_checkpoint(trained_looking(TINY), tmp_path / "m.safetensors")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "stt_fast", "serve", "--checkpoint", str(checkpoint), "--port",
                               str(port), "--backend", "reference", "--max-batch", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    def read_stderr() -> None:
        for line in server.stderr:  # line by line, so that the wait below sees each as it comes
            lines.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any(line.startswith("[serve] ready in") for line in lines):  # the command's own word for it
            assert time.monotonic() < deadline and server.poll() is None, f"the service did not start: {lines}"
            time.sleep(0.2)
        assert get(f"{base}/readyz")[0] == 200
        clip = np.random.default_rng(0).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
        status, answer, _ = _post(base, _npy(clip), "application/x-npy")
        assert status == 200 and set(answer["probabilities"]) == set(TINY_LABELS), answer
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    stderr = "".join(lines)
    assert server.returncode == 0, stderr
    assert "[serve] stopping" in stderr and "Traceback" not in stderr, stderr
    with pytest.raises(OSError):
        get(f"{base}/healthz", timeout_s=3)


# --- a real service on loopback -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(tmp_path_factory):
    pytest.importorskip("ray.serve", reason="Ray Serve is the serve extra (the dev extra installs it)")
    from ray import serve
    from stt_fast.benchmarks.bench_serve import free_port

    from stt_fast.serving.app import ServeOptions, build_app, start, stop, wait_until_ready

    root = tmp_path_factory.mktemp("serve")
    checkpoint = save_checkpoint(trained_looking(TINY), root / "m.safetensors")
    videos = []
    for label in (0, 3, 4):
        videos.append(root / f"clip{label}.mp4")
        write_long_video(videos[-1], [(label, 1.0)], fps=20, size=64)
    long_video = root / "long.mp4"  # decoding it takes a while: the overload test's slow requests
    write_long_video(long_video, [(1, 12.0)], fps=25, size=96)
    spec = ModelSpec("reference", str(checkpoint), None, None, "cpu")
    port = free_port()
    main = ServeOptions(spec, replicas=2, cpus_per_replica=0.5, max_batch=4, batch_wait_ms=150, max_queue=32,
                        max_upload_mb=0.5, request_timeout_s=30)
    started_ray = start(main, port=port, ready_timeout_s=240)
    tight = ServeOptions(spec, replicas=1, cpus_per_replica=0.5, max_batch=1, batch_wait_ms=0, max_queue=1,
                         max_upload_mb=8)
    serve.run(build_app(tight, "tight"), name="tight", route_prefix="/tight", blocking=False)
    wait_until_ready("tight", 1, 240)
    base = f"http://127.0.0.1:{port}"
    yield {"base": base, "port": port, "checkpoint": checkpoint, "videos": videos, "long_video": long_video}
    stop(started_ray)
    import ray

    assert not ray.is_initialized()
    from stt_fast.benchmarks.bench_serve import get

    with pytest.raises(OSError):  # nothing listens any more
        get(f"{base}/healthz", timeout_s=3)


def _post(base: str, body: bytes, content_type: str, query: str = "") -> tuple[int, dict, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{base}/v1/predict{query}", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_same_numbers_as_predict(service):
    """Each upload's label and probabilities equal `stt-fast predict`'s on the same file and backend, and
    the answer names the backend and the checkpoint's hash."""
    from stt_fast.files import sha256_file
    from stt_fast.predict import predict_paths
    from stt_fast.predictors import load_predictor

    want = predict_paths([str(v) for v in service["videos"]], load_predictor("reference",
                                                                               checkpoint=service["checkpoint"]))
    for video, expected in zip(service["videos"], want):
        status, answer, _ = _post(service["base"], *_multipart(video.name, video.read_bytes()))
        assert status == 200, answer
        assert answer["label"] == expected["label"] and answer["warnings"] == expected["warnings"]
        assert answer["probabilities"] == pytest.approx(expected["probabilities"], abs=2e-6)
        assert answer["backend"] == "reference" and answer["checkpoint_sha256"] == sha256_file(service["checkpoint"])


def test_concurrent_requests_share_forward_passes(service):
    from stt_fast.benchmarks.bench_serve import get, run_load

    clips = np.random.default_rng(1).integers(0, 256, (8, 4, 3, 64, 64), dtype=np.uint8)
    result = run_load(service["base"], [(_npy(c), "application/x-npy") for c in clips], concurrency=8, requests=24,
                      timeout_s=30)
    assert result.statuses == {200: 24}, result.refusals
    total, count = result.batch_sizes
    assert count == 24 and total / count > 1.5, "with 8 clients and a 150 ms wait, batches hold several clips"
    assert max(a["batch_size"] for a in result.answers) > 1
    samples = read_metrics(get(f"{service['base']}/metrics")[1])
    assert samples['stt_fast_requests_total{status="200"}'] >= 24 and samples["stt_fast_in_flight"] == 0


@pytest.mark.parametrize("make,status,message", [
    (lambda s: (b"\x00" * (600 * 1024), "video/mp4"), 413, "this server takes at most 0.5 MiB"),
    (lambda s: (b"definitely not a video", "video/mp4"), 400, "could not be read as a video"),
    (lambda s: (_npy(np.zeros((4, 3, 32, 32), np.uint8)), "application/x-npy"), 400, r"must be uint8 \[4, 3, 64, 64\]"),
    (lambda s: _multipart("a.mp4", b"xx", field="video"), 400, "without a 'file' field"),
], ids=["413-too-large", "400-unreadable", "400-npy-shape", "400-no-file"])
def test_refusals_carry_their_reason(service, make, status, message):
    code, answer, _ = _post(service["base"], *make(service))
    assert code == status and re.search(message, answer["error"]), answer


def test_unknown_routes_are_404_and_health_and_readiness(service):
    from stt_fast.benchmarks.bench_serve import get

    status, body = get(f"{service['base']}/v2/anything")
    assert status == 404 and "no route GET /v2/anything" in json.loads(body)["error"]
    assert get(f"{service['base']}/healthz") == (200, '{"status":"ok"}')
    status, body = get(f"{service['base']}/readyz")
    assert status == 200 and json.loads(body) | {"status": None} == {"ready": True, "replicas_running": 2,
                                                                     "replicas_wanted": 2, "status": None}


def test_overload_answers_503_with_retry_after(service):
    """The tight app admits 3 requests (1 replica x 2 batches of 1, 1 queued): 16 concurrent uploads of a
    video that takes a while to decode overflow it; the overflow is refused at once, never queued."""
    from stt_fast.benchmarks.bench_serve import run_load

    body = _multipart("long.mp4", service["long_video"].read_bytes())
    result = run_load(f"{service['base']}/tight", [body], concurrency=16, requests=16, timeout_s=60)
    assert set(result.statuses) <= {200, 503} and result.statuses[503] > 0 and result.statuses[200] >= 1, \
        result.statuses
    assert all(r["retry_after"] == "1" and "at capacity" in r["body"] for r in result.refusals), result.refusals[:2]


def test_a_killed_replica_is_restarted_and_no_request_hangs(service):
    """One of the two Classifier replicas killed under load: every request ends (200, or a 5xx saying
    why) within its timeout, Ray starts a replacement, and the service is ready again."""
    from stt_fast.benchmarks.bench_serve import run_load_killing_a_replica

    clips = np.random.default_rng(2).integers(0, 256, (4, 4, 3, 64, 64), dtype=np.uint8)
    bodies = [(_npy(c), "application/x-npy") for c in clips]
    result, ready_again_s = run_load_killing_a_replica(service["base"], bodies, concurrency=4, requests=60,
                                                       timeout_s=20)
    assert sum(result.statuses.values()) == 60 and "timeout" not in result.statuses, result.statuses
    assert set(result.statuses) <= {200, 500, 503, 504} and result.statuses[200] > 0, result.statuses
    assert all(r["status"] >= 500 and "error" in json.loads(r["body"]) for r in result.refusals)
    assert ready_again_s is not None, "the killed replica was not replaced within 90 s"
    status, answer, _ = _post(service["base"], *bodies[0])
    assert status == 200, answer


def test_cli_serve_refuses_a_taken_port_in_one_line(service, tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "stt_fast", "serve", "--checkpoint", str(service["checkpoint"]),
                             "--port", str(service["port"])], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
        f"stt-fast serve: error: cannot listen on 127.0.0.1:{service['port']}"), result.stderr
    assert "Traceback" not in result.stderr

