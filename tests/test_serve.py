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
    from stt_fast.serving.app import ServeOptions, capacity, check_ray_options, deployment_limits
    from stt_fast.serving.service import check_options

    spec = ModelSpec("reference", "m.safetensors", None, None, "cpu")
    options = ServeOptions(spec, replicas=3, max_batch=8, max_queue=10, max_uploads=5)
    assert capacity(options) == 2 * 8 + 10  # per replica: a batch in its pass, the next gathering, then the queue
    assert deployment_limits(options) == {"max_ongoing_requests": 26 + 5 + 64, "max_queued_requests": 10 + 64}
    for bad, message in [({"replicas": 0}, "replicas"), ({"max_batch": 0}, "max_batch"),
                         ({"batch_wait_ms": -1}, "batch_wait_ms"), ({"max_upload_mb": 0}, "max_upload_mb"),
                         ({"max_uploads": 0}, "max_uploads"), ({"no_face": "maybe"}, "no_face"),
                         ({"api_key": "short"}, "api_key must be at least 16 characters, got \\(hidden\\)")]:
        with pytest.raises(ValueError, match=message):
            check_options(ServeOptions(spec, **bad))
    with pytest.raises(ValueError, match="gpus-per-replica"):
        check_ray_options(ServeOptions(ModelSpec("tensorrt", None, None, "m.engine", None)))


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


@pytest.mark.parametrize("mode", [[], ["--ray", "local"]], ids=["embedded", "ray"])
def test_cli_serve_answers_then_stops_cleanly_on_sigterm(tmp_path, mode):
    """The command as a user starts it: ready, one answer, then SIGTERM (docker stop, systemd): status 0,
    everything shut down, nothing listens on the port any more, no traceback and nothing in colour."""
    import signal
    import subprocess
    import sys

    from stt_fast.benchmarks.bench_serve import free_port, get

    checkpoint = save_checkpoint(trained_looking(TINY), tmp_path / "m.safetensors")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "stt_fast", "serve", "--checkpoint", str(checkpoint), "--port",
                               str(port), "--backend", "reference", "--max-batch", "2", *mode],
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
    assert "[serve] stopping" in stderr and "Traceback" not in stderr and "\x1b[" not in stderr, stderr
    with pytest.raises(OSError):
        get(f"{base}/healthz", timeout_s=3)


# --- the request path's pieces (no server) ------------------------------------------------------------------

def test_an_npy_header_declaring_petabytes_is_refused_before_anything_is_made():
    """A header of 10^18 bytes: refused from the header (np.load would have raised MemoryError, a 500)."""
    from numpy.lib import format as npy

    buffer = io.BytesIO()
    npy.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": (10**9, 10**9)})
    with pytest.raises(UploadError, match=r"must be uint8 \[4, 3, 64, 64\] .*; got uint8 \[1000000000, 1000000000\]") \
            as caught:
        clip_from_npy(buffer.getvalue() + b"\x00" * 64, 4, 64)
    assert caught.value.status == 400
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UploadError):  # an object array (pickle) is never loaded
        clip_from_npy(pickled.getvalue(), 4, 64)
    clip = np.random.default_rng(3).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
    assert torch.equal(clip_from_npy(_npy(np.asfortranarray(clip)), 4, 64) * 255, torch.from_numpy(clip).float())


@pytest.mark.parametrize("filename,message", [("a\x00.mp4", "not a video"), ("clip." + "x" * 300, "not a video"),
                                               ("notes.txt", "not a video"), ("../../etc/passwd", "not a video")],
                         ids=["nul", "long-suffix", "text", "path"])
def test_upload_names_must_be_videos(filename, message):
    with pytest.raises(UploadError, match=message) as caught:
        parse_upload(b"data", "application/octet-stream", filename)
    assert caught.value.status == 400 and "/tmp" not in caught.value.reason


def test_a_multipart_upload_of_many_parts_is_refused_before_it_is_parsed():
    """120,000 parts (19 s of the multipart parser's time on the event loop before): counted, refused, unparsed."""
    parts = b"".join(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n\r\nx\r\n".encode()
                     for i in range(120_000))
    with pytest.raises(UploadError, match="more than 16 parts"):
        parse_upload(parts + f"--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}")


def test_the_api_key_is_compared_in_constant_time_and_required():
    from stt_fast.serving.service import Service

    service = Service.__new__(Service)
    service.options = type("O", (), {"api_key": "k" * 20})()
    assert service.authorised("Bearer " + "k" * 20) and not service.authorised("Bearer " + "k" * 19)
    assert not service.authorised(None) and not service.authorised("k" * 21)
    service.options.api_key = None
    assert service.authorised(None)


def test_the_batcher_runs_a_lone_clip_at_once_and_gathers_what_waits_while_busy():
    """No fixed wait: an idle model takes one clip at once; clips arriving during a pass go together next."""
    import asyncio

    from stt_fast.serving.batcher import DynamicBatcher

    release, passes = threading.Event(), []

    def run(clips):
        passes.append(len(clips))
        if len(passes) == 1:
            release.wait(10)  # the first pass lasts until the other clips are queued
        return [{"label": "x"} for _ in range(len(clips))]

    async def scenario():
        batcher = DynamicBatcher(run, max_batch=8, batch_wait_ms=1000)
        first = asyncio.ensure_future(batcher.classify(torch.zeros(1)))
        while not passes:
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher.classify(torch.zeros(1))) for _ in range(3)]
        await asyncio.sleep(0.05)
        release.set()
        rows = await asyncio.gather(first, *rest)
        batcher.close()
        return rows

    rows = asyncio.run(scenario())
    assert passes == [1, 3] and [r["batch_size"] for r in rows] == [1, 3, 3, 3]


def test_decoding_stops_when_its_request_gives_up(tmp_path):
    from stt_fast.data.pipeline import ClipPipeline
    from stt_fast.data.video import Cancelled

    video = tmp_path / "long.mp4"
    write_long_video(video, [(1, 8.0)], fps=25, size=64)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        ClipPipeline(4, 64).load(video, stop=stop)


# --- real services on loopback, in both modes -----------------------------------------------------------------

API_KEY = "stt-fast-test-key-0123456789"


class _Servers:
    """The service (API key on) and a tightly bounded one, in one mode; their base URLs."""

    def __init__(self, mode: str, root) -> None:
        from stt_fast.benchmarks.bench_serve import free_port

        from stt_fast.serving.service import ServeOptions

        self.mode, self.checkpoint = mode, save_checkpoint(trained_looking(TINY), root / "m.safetensors")
        self.videos = []
        for label in (0, 3, 4):
            self.videos.append(root / f"clip{label}.mp4")
            write_long_video(self.videos[-1], [(label, 1.0)], fps=20, size=64)
        self.long_video = root / "long.mp4"
        write_long_video(self.long_video, [(1, 12.0)], fps=25, size=96)
        spec = ModelSpec("reference", str(self.checkpoint), None, None, "cpu")
        self.main = ServeOptions(spec, replicas=2 if mode == "ray" else 1, cpus_per_replica=0.5, max_batch=4,
                                 batch_wait_ms=50, max_queue=32, max_upload_mb=0.5, request_timeout_s=30,
                                 api_key=API_KEY)
        self.tight = ServeOptions(spec, replicas=1, cpus_per_replica=0.5, max_batch=1, batch_wait_ms=0, max_queue=1,
                                  max_upload_mb=8, max_uploads=2, upload_timeout_s=1.5, min_upload_kbps=1000)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        if mode == "embedded":
            from stt_fast.serving.embedded import EmbeddedServer

            self.servers = [EmbeddedServer(self.main, port=self.port)]
            self.tight_port = free_port()
            self.servers.append(EmbeddedServer(self.tight, port=self.tight_port))
            self.threads = [s.start_in_thread() for s in self.servers]
            self.tight_base = f"http://127.0.0.1:{self.tight_port}"
        else:
            from ray import serve

            from stt_fast.serving.app import build_app, start, wait_until_ready

            self.started_ray = start(self.main, port=self.port, ready_timeout_s=240)
            serve.run(build_app(self.tight, "tight"), name="tight", route_prefix="/tight", blocking=False)
            wait_until_ready("tight", 1, 240)
            self.tight_base = f"{self.base}/tight"

    def close(self) -> None:
        if self.mode == "embedded":
            for server, thread in zip(self.servers, self.threads):
                server.stop(thread)
        else:
            import ray

            from stt_fast.serving.app import stop

            stop(self.started_ray)
            assert not ray.is_initialized()


@pytest.fixture(scope="module", params=["embedded", "ray"])
def service(request, tmp_path_factory):
    if request.param == "ray":
        pytest.importorskip("ray.serve", reason="Ray Serve is the serve extra (the dev extra installs it)")
    servers = _Servers(request.param, tmp_path_factory.mktemp(f"serve-{request.param}"))
    yield servers
    base = servers.base
    servers.close()
    from stt_fast.benchmarks.bench_serve import get

    with pytest.raises(OSError):  # nothing listens any more
        get(f"{base}/healthz", timeout_s=3)


def _post(base: str, body: bytes, content_type: str, query: str = "", key: str | None = API_KEY,
          route: str = "/v1/predict") -> tuple[int, dict, dict]:
    import urllib.error
    import urllib.request

    headers = {"Content-Type": content_type} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(f"{base}{route}{query}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # headers: case-insensitive
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def test_same_numbers_as_predict(service):
    """Each upload's label and probabilities equal `stt-fast predict`'s on the same file and backend (decoded
    from memory: no file left anywhere), and the answer names the backend and the checkpoint's hash."""
    import tempfile
    from pathlib import Path

    from stt_fast.files import sha256_file
    from stt_fast.predict import predict_paths
    from stt_fast.predictors import load_predictor

    want = predict_paths([str(v) for v in service.videos], load_predictor("reference", checkpoint=service.checkpoint))
    before = set(Path(tempfile.gettempdir()).glob("stt_fast-upload-*"))
    for video, expected in zip(service.videos, want):
        status, answer, _ = _post(service.base, *_multipart(video.name, video.read_bytes()))
        assert status == 200, answer
        assert answer["label"] == expected["label"] and answer["warnings"] == expected["warnings"]
        assert answer["probabilities"] == pytest.approx(expected["probabilities"], abs=2e-6)
        assert answer["backend"] == "reference" and answer["checkpoint_sha256"] == sha256_file(service.checkpoint)
    status, answer, _ = _post(service.base, service.videos[0].read_bytes(), "video/mp4", "?filename=a.mp4")
    assert status == 200 and answer["label"] == want[0]["label"], "the raw body: the same answer"
    assert set(Path(tempfile.gettempdir()).glob("stt_fast-upload-*")) == before


def test_the_api_key_is_required_and_health_stays_open(service):
    from stt_fast.benchmarks.bench_serve import get

    clip = _npy(np.zeros((4, 3, 64, 64), np.uint8))
    for key in (None, "wrong-key-0123456789"):
        status, answer, headers = _post(service.base, clip, "application/x-npy", key=key)
        assert status == 401 and "API key" in answer["error"] and headers.get("WWW-Authenticate") == "Bearer"
    assert get(f"{service.base}/healthz")[0] == 200 and get(f"{service.base}/metrics")[0] == 401


def test_concurrent_requests_share_forward_passes(service):
    from stt_fast.benchmarks.bench_serve import run_load

    clips = np.random.default_rng(1).integers(0, 256, (8, 4, 3, 64, 64), dtype=np.uint8)
    result = run_load(service.base, [(_npy(c), "application/x-npy") for c in clips], concurrency=8, requests=24,
                      timeout_s=30, headers={"Authorization": f"Bearer {API_KEY}"})
    assert result.statuses == {200: 24}, result.refusals
    _, count = result.batch_sizes
    assert max(a["batch_size"] for a in result.answers) > 1, "concurrent clips shared passes"
    # /metrics is the answering process's: the whole service embedded, one replica's share on Ray
    assert count == 24 if service.mode == "embedded" else 0 < count <= 24


@pytest.mark.parametrize("make,status,message", [
    (lambda s: (b"definitely not a video", "video/mp4"), 400, "could not be read as a video"),
    (lambda s: (_npy(np.zeros((4, 3, 32, 32), np.uint8)), "application/x-npy"), 400, r"must be uint8 \[4, 3, 64, 64\]"),
    (lambda s: _multipart("a.mp4", b"xx", field="video"), 400, "without a 'file' field"),
    (lambda s: _multipart("a.exe", b"xx"), 400, "not a video this server reads"),
], ids=["400-unreadable", "400-npy-shape", "400-no-file", "400-suffix"])
def test_refusals_carry_their_reason(service, make, status, message):
    code, answer, _ = _post(service.base, *make(service))
    assert code == status and re.search(message, answer["error"]), answer


def _read_response(conn) -> str:
    """One HTTP response from a raw socket: its status line and headers may arrive apart from its body."""
    data = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return data.decode()
        data += chunk
        head, separator, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: (\d+)", head)
        if separator and length and len(body) >= int(length.group(1)):
            return data.decode()


def test_a_body_declared_too_large_is_refused_before_it_is_sent(service):
    """413 from the headers alone: the client has sent no byte of its 600 KB body (over the 0.5 MiB limit)."""
    import socket

    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as conn:
        conn.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\nAuthorization: Bearer "
                     f"{API_KEY}\r\nContent-Length: {600 * 1024}\r\n\r\n".encode())
        answer = _read_response(conn)
    assert answer.startswith("HTTP/1.1 413") and "0.5 MiB" in answer, answer


def test_unknown_routes_are_404_and_health_and_readiness(service):
    from stt_fast.benchmarks.bench_serve import get

    status, body = get(f"{service.base}/v3/anything")
    assert status == 404 and "no route GET /v3/anything" in json.loads(body)["error"]
    assert get(f"{service.base}/healthz") == (200, '{"status":"ok"}')
    status, body = get(f"{service.base}/readyz")
    assert status == 200 and json.loads(body)["ready"] is True


def test_the_open_inference_protocol_with_tritonclient(service):
    """tritonclient.http, unchanged, against stt-fast serve: metadata, readiness, and infer with binary and JSON
    tensors, clips and video files; the numbers are /v1/predict's."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(service.base.removeprefix("http://"))
    auth = {"Authorization": f"Bearer {API_KEY}"}  # copied for each call: tritonclient adds its own keys to it
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("stt", headers=dict(auth))
    meta = client.get_model_metadata("stt", headers=dict(auth))
    assert meta["inputs"][0] == {"name": "clips", "datatype": "UINT8", "shape": [-1, 4, 3, 64, 64]}
    clips = np.random.default_rng(5).integers(0, 256, (2, 4, 3, 64, 64), dtype=np.uint8)
    binary = triton.InferInput("clips", list(clips.shape), "UINT8")
    binary.set_data_from_numpy(clips)
    result = client.infer("stt", [binary], headers=dict(auth))
    _, first, _ = _post(service.base, _npy(clips[0]), "application/x-npy")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (2, 7) and result.as_numpy("label")[0].decode() == first["label"]
    assert probabilities[0] == pytest.approx(list(first["probabilities"].values()), abs=2e-6)
    as_json = triton.InferInput("clips", [1, 4, 3, 64, 64], "UINT8")
    as_json.set_data_from_numpy(clips[:1], binary_data=False)
    labels = client.infer("stt", [as_json], outputs=[triton.InferRequestedOutput("label", binary_data=False)],
                          headers=dict(auth))
    assert labels.get_response()["outputs"][0]["data"] == [first["label"]]
    video = triton.InferInput("video", [1], "BYTES")
    video.set_data_from_numpy(np.array([service.videos[0].read_bytes()], dtype=object))
    from_file = client.infer("stt", [video], headers=dict(auth))
    _, answer, _ = _post(service.base, *_multipart("v.mp4", service.videos[0].read_bytes()))
    assert from_file.as_numpy("label")[0].decode() == answer["label"]
    wrong = triton.InferInput("clips", [1, 4, 3, 32, 32], "UINT8")
    wrong.set_data_from_numpy(np.zeros((1, 4, 3, 32, 32), np.uint8))
    with pytest.raises(InferenceServerException, match=r"UINT8 or FP32 \[1, 4, 3, 64, 64\]"):
        client.infer("stt", [wrong], headers=dict(auth))
    with pytest.raises(InferenceServerException, match="no model 'other'"):
        client.infer("other", [binary], headers=dict(auth))


def test_overload_answers_503_with_retry_after(service):
    """The tight service admits 3 requests past their upload (a clip in the pass, one gathering, one queued):
    16 concurrent uploads of a longer video overflow it; the overflow is refused at once, never queued."""
    from stt_fast.benchmarks.bench_serve import run_load

    body = _multipart("long.mp4", service.long_video.read_bytes())
    result = run_load(service.tight_base, [body], concurrency=16, requests=16, timeout_s=60)
    assert set(result.statuses) <= {200, 503} and result.statuses[503] > 0 and result.statuses[200] >= 1, \
        result.statuses
    assert all(r["retry_after"] == "1" and "retry after a moment" in r["body"] for r in result.refusals), \
        result.refusals[:2]


def _tight_port(service) -> int:
    return service.tight_port if service.mode == "embedded" else service.port


def _tight_path(service) -> str:
    """The tight service's predict route ("/tight/v1/predict" on Ray, where it is an app beside the other)."""
    return ("" if service.mode == "embedded" else "/tight") + "/v1/predict"


def _slow_upload(port: int, path: str, declared: int, seconds: float) -> bytes:
    """A client sending a byte every half second: what it gets back, or b"" if the server closed first."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=seconds + 10) as conn:
        conn.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\nContent-Length: {declared}"
                     "\r\n\r\n".encode())
        ended = time.monotonic() + seconds
        try:
            while time.monotonic() < ended:
                conn.sendall(b"x")
                time.sleep(0.5)
            return _read_response(conn).encode()
        except OSError:
            return b""


def test_slow_uploads_hold_only_their_upload_slots_and_time_out(service):
    """Two clients trickling a byte every half second fill the tight service's two upload slots: a third upload
    gets 503 at once, /healthz still answers, and the trickles get 408 at their deadline; then uploads go through."""
    from stt_fast.benchmarks.bench_serve import get

    answers: list[bytes] = []
    trickles = [threading.Thread(target=lambda: answers.append(_slow_upload(_tight_port(service), _tight_path(service),
                                                                            10**5, 6.0))) for _ in range(2)]
    for t in trickles:
        t.start()
    time.sleep(0.5)
    clip = _npy(np.zeros((4, 3, 64, 64), np.uint8))
    status, answer, headers = _post(service.tight_base, clip, "application/x-npy", key=None)
    assert status == 503 and "uploads are arriving" in answer["error"] and headers["Retry-After"] == "1"
    assert get(f"{service.tight_base}/healthz", timeout_s=2)[0] == 200
    for t in trickles:
        t.join(timeout=30)
    assert len(answers) == 2 and all(a.startswith(b"HTTP/1.1 408") and b"did not arrive" in a for a in answers), \
        answers
    assert _post(service.tight_base, clip, "application/x-npy", key=None)[0] == 200


def test_a_client_that_disconnects_is_499_not_500(service):
    import socket

    from stt_fast.benchmarks.bench_serve import get

    from stt_fast.serving.metrics import read_metrics

    if service.mode == "ray":
        pytest.skip("Ray Serve's proxy does not pass on a request whose client vanished mid-body (measured: the "
                    "replica counts nothing, neither 499 nor 500)")
    with socket.create_connection(("127.0.0.1", _tight_port(service))) as conn:
        conn.sendall(f"POST {_tight_path(service)} HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\n"
                     "Content-Length: 5000\r\n\r\npartial".encode())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        samples = read_metrics(get(f"{service.tight_base}/metrics")[1])
        if samples.get('stt_fast_requests_total{status="499"}'):
            break
        time.sleep(0.1)
    assert samples.get('stt_fast_requests_total{status="499"}') == 1
    assert not samples.get('stt_fast_requests_total{status="500"}')


def test_the_services_listen_on_loopback_only(service):
    """Nothing of the embedded server listens beyond 127.0.0.1; in the Ray mode the HTTP port is on loopback and
    Ray's token authentication is on with a token only its owner reads (Ray's own sockets listen on every
    interface: docs/scale.md)."""
    import os
    import stat
    import subprocess

    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
    ours = [line.split()[3] for line in listening if f"pid={os.getpid()}," in line]
    http = [address for address in ours if address.endswith(f":{service.port}")]
    if service.mode == "embedded":
        assert ours and all(address.startswith("127.0.0.1:") for address in ours), ours
        return
    assert not http, "the HTTP port is Serve's proxy's, not this process's"
    proxy = [line.split()[3] for line in listening if line.split()[3].endswith(f":{service.port}")]
    assert proxy == [f"127.0.0.1:{service.port}"], proxy
    assert os.environ["RAY_AUTH_MODE"] == "token"
    token = os.environ["RAY_AUTH_TOKEN_PATH"]
    assert stat.S_IMODE(os.stat(token).st_mode) == 0o600 and stat.S_IMODE(os.stat(os.path.dirname(token)).st_mode) \
        == 0o700


def test_a_killed_replica_is_restarted_and_no_request_hangs(service):
    """Ray: one of the two replicas killed under load: every request ends (200, or a 5xx saying why) within its
    timeout, Ray starts a replacement, and the service is ready again."""
    if service.mode != "ray":
        pytest.skip("replicas are the Ray mode's")
    from stt_fast.benchmarks.bench_serve import run_load_killing_a_replica

    clips = np.random.default_rng(2).integers(0, 256, (4, 4, 3, 64, 64), dtype=np.uint8)
    bodies = [(_npy(c), "application/x-npy") for c in clips]
    result, ready_again_s = run_load_killing_a_replica(service.base, bodies, concurrency=4, requests=60, timeout_s=20,
                                                       headers={"Authorization": f"Bearer {API_KEY}"})
    assert sum(result.statuses.values()) == 60 and "timeout" not in result.statuses, result.statuses
    assert set(result.statuses) <= {200, 500, 503, 504} and result.statuses[200] > 0, result.statuses
    assert ready_again_s is not None, "the killed replica was not replaced within 90 s"
    assert _post(service.base, *bodies[0])[0] == 200


def test_cli_serve_refuses_a_taken_port_in_one_line(service, tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "stt_fast", "serve", "--checkpoint", str(service.checkpoint),
                             "--port", str(service.port)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
        f"stt-fast serve: error: cannot listen on 127.0.0.1:{service.port}"), result.stderr
    assert "Traceback" not in result.stderr
