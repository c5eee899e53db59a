"""Everything between an HTTP request and the model, for both serving modes (embedded.py: one process on
uvicorn; app.py: Ray Serve): the routes, what an upload may cost, admission, decoding, timeouts, errors,
metrics, the API key. The model itself is a ModelClient: a DynamicBatcher in this process, or Ray replicas.

Routes (every error is one JSON line {"error": ...} with its status; no request ever gets a traceback):
    POST /v1/predict                    a video (multipart field 'file', or the raw body: video/*, application/
                                        octet-stream with ?filename=) or a .npy uint8 clip -> label, probabilities
    GET  /healthz, /readyz              the process is up / the model is ready (503 until then)
    GET  /metrics                       Prometheus text (metrics.py)
    /v2/...                             the Open Inference Protocol (KServe v2, Triton's HTTP protocol: kserve.py)

What a request may cost, in the order it is checked:
1. the API key, when one is set (Authorization: Bearer KEY, compared in constant time): 401;
2. bodies being read at once, at most max_uploads: 503 with Retry-After (a slow upload holds only this slot);
3. the body: a declared size over max_upload_mb is refused before it is read (413), a body that grows past it
   while read too; it must arrive within upload_timeout_s plus its size at min_upload_kbps (408): 40 clients
   sending a byte a second hold 40 upload slots for upload_timeout_s, and nothing else;
4. requests past their upload and not yet answered (decoding, queued, in a batch), at most capacity: 503 with
   Retry-After, at once;
5. decoding, on a pool of decode_workers threads of its own (never the event loop, never the default pool
   that readiness uses): the multipart parser (at most MAX_PARTS parts), the .npy header checked before any
   array is made, videos decoded from memory (no temporary file: nothing is left on disk if the process
   dies) within the frame size, duration and frame count limits, checked before decoding;
6. the answer within request_timeout_s of arrival: 504 after it, and the decoding it was waiting for stops
   at its next frame.
A client that disconnects is counted as 499 and logged in one line.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from stt_fast.data.video import ReadLimits
from stt_fast.predictors import ModelSpec

from .metrics import ServiceMetrics
from .uploads import UploadError, check_declared_size, clip_from_npy, parse_upload

log = logging.getLogger(__name__)

# The bounds of a video upload (a server takes files from anyone): 4K frames, 2 minutes, 7,200 frames.
SERVE_LIMITS = ReadLimits(max_frame_pixels=3840 * 2160, max_seconds=120.0, max_frames=7200)


@dataclass(frozen=True)
class ServeOptions:
    """What `stt-fast serve` sets; checked by check_options before anything starts. replicas, gpus_per_replica
    and cpus_per_replica are the Ray mode's."""

    spec: ModelSpec
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    max_queue: int = 64
    max_upload_mb: float = 64.0
    request_timeout_s: float = 60.0
    upload_timeout_s: float = 30.0
    min_upload_kbps: float = 64.0
    max_uploads: int = 32
    decode_workers: int = 2
    detect_face: bool = False
    no_face: str = "skip"
    limits: ReadLimits = field(default_factory=lambda: SERVE_LIMITS)
    api_key: str | None = None
    model_name: str = "stt"

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
             ("request_timeout_s", options.request_timeout_s > 0, "positive"),
             ("upload_timeout_s", options.upload_timeout_s > 0, "positive"),
             ("min_upload_kbps", options.min_upload_kbps > 0, "positive"),
             ("max_uploads", options.max_uploads >= 1, "at least 1"),
             ("decode_workers", options.decode_workers >= 1, "at least 1"),
             ("no_face", options.no_face in ("skip", "full", "error"), "skip, full or error"),
             ("api_key", options.api_key is None or len(options.api_key) >= 16, "at least 16 characters")]
    for name, ok, expected in rules:
        if not ok:
            shown = "(hidden)" if name == "api_key" else repr(getattr(options, name))
            raise ValueError(f"{name} must be {expected}, got {shown}")


class ModelClient(Protocol):
    """The model as the service sees it: one clip at a time in, one row out (batching is the client's)."""

    capacity: int  # requests the service admits past their upload at once

    async def classify(self, clip: torch.Tensor) -> dict: ...  # {"label", "probabilities", "logits", "batch_size"}

    async def facts(self) -> dict: ...  # {"backend", "checkpoint_sha256", "num_frames", "image_size", "config"}

    async def readiness(self) -> tuple[bool, dict]: ...


def rows_of(logits: torch.Tensor, labels: list[str]) -> list[dict]:
    """logits [B, K] -> one {"label", "probabilities", "logits"} per clip (what a ModelClient answers)."""
    from stt_fast.predict import probabilities

    return [row | {"logits": [float(v) for v in values]} for row, values in zip(probabilities(logits, labels),
                                                                                logits.float())]


class Overloaded(Exception):
    """Admission refused: 503 with Retry-After."""


@dataclass
class Answer:
    status: int
    body: dict | bytes
    headers: dict[str, str] = field(default_factory=dict)
    batch_size: int | None = None


class Service:
    """The request path (module docstring) over a ModelClient."""

    def __init__(self, options: ServeOptions, model: ModelClient) -> None:
        check_options(options)
        self.options, self.model = options, model
        self.metrics = ServiceMetrics()
        self.uploading = 0  # bodies being read
        self.working = 0  # past their upload, not yet answered
        self.decode_pool = ThreadPoolExecutor(options.decode_workers, thread_name_prefix="stt_fast-decode")
        self._pipeline = None

    # --- admission ------------------------------------------------------------------------------------------

    def authorised(self, authorization: str | None) -> bool:
        key = self.options.api_key
        if key is None:
            return True
        given = (authorization or "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), key.encode())

    @property
    def capacity(self) -> int:
        return self.model.capacity

    async def read_body(self, headers, chunks) -> bytes:
        """The request body from the async iterator `chunks`, within the size limit and the upload deadline."""
        limit = self.options.max_upload_bytes
        declared = headers.get("content-length")
        check_declared_size(declared, limit)
        expected = int(declared) if declared and declared.isdigit() else limit
        allowed = self.options.upload_timeout_s + expected / (self.options.min_upload_kbps * 1024)
        deadline = time.monotonic() + allowed
        if self.uploading >= self.options.max_uploads:
            raise Overloaded(f"{self.uploading} uploads are arriving already (--max-uploads)")
        self.uploading += 1
        body = bytearray()
        try:
            stream = chunks.__aiter__()
            while True:
                left = deadline - time.monotonic()
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), timeout=max(left, 0.001))
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise UploadError(408, f"the upload did not arrive within {allowed:.0f} s ({len(body)} of "
                                           f"{declared or 'an unknown number of'} bytes; this server needs "
                                           f"{self.options.min_upload_kbps:g} KiB/s)") from None
                body += chunk
                if len(body) > limit:
                    raise UploadError(413, f"the upload is over {limit / 2**20:.1f} MiB, this server's limit "
                                           "(--max-upload-mb)")
        finally:
            self.uploading -= 1
        return bytes(body)

    async def admitted(self, work: Callable[[float], Awaitable[Answer]]) -> Answer:
        """work(deadline) with a work slot, within request_timeout_s of now (504 after it)."""
        if self.working >= self.capacity:
            raise Overloaded(f"the service is at capacity ({self.capacity} requests in progress or waiting)")
        self.working += 1
        self.metrics.in_flight.set(self.working)
        try:
            deadline = time.monotonic() + self.options.request_timeout_s
            return await asyncio.wait_for(work(deadline), timeout=self.options.request_timeout_s)
        finally:
            self.working -= 1
            self.metrics.in_flight.set(self.working)

    # --- decoding (on the decode pool) -----------------------------------------------------------------------

    async def facts(self) -> dict:
        return await self.model.facts()

    async def pipeline(self):
        if self._pipeline is None:
            from stt_fast.data.pipeline import ClipPipeline

            facts = await self.facts()
            options = self.options
            self._pipeline = ClipPipeline(facts["num_frames"], facts["image_size"], detect_face=options.detect_face,
                                          no_face=options.no_face, limits=options.limits)
        return self._pipeline

    async def decode(self, fn: Callable, *args, deadline: float):
        """fn(*args, stop) on the decode pool, stopped (stop set) when the request's time is up."""
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.decode_pool, fn, *args, stop)
        try:
            return await asyncio.wait_for(future, timeout=max(deadline - time.monotonic(), 0.001))
        except (asyncio.TimeoutError, asyncio.CancelledError):
            stop.set()  # the decoding in flight stops at its next frame
            raise

    @staticmethod
    def clip_of(pipeline, upload, stop: threading.Event):
        """(clip or None, warnings, skipped reason or None) of an Upload, in a decode thread."""
        from stt_fast.data.pipeline import NoFaceSkipped
        from stt_fast.data.video import BadClipError, InMemoryVideo

        if upload.kind == "npy":
            return clip_from_npy(upload.data, pipeline.num_frames, pipeline.image_size), [], None
        try:
            clip, warnings = pipeline.load(InMemoryVideo(f"upload{upload.suffix}", upload.data), stop=stop)
        except NoFaceSkipped as e:
            return None, [], str(e)
        except BadClipError as e:
            raise UploadError(400, f"the uploaded file could not be read as a video: {e}") from None
        return clip, warnings, None

    def parse_and_decode(self, pipeline, body: bytes, content_type: str | None, filename: str | None,
                         stop: threading.Event):
        return self.clip_of(pipeline, parse_upload(body, content_type, filename), stop)

    # --- the routes' work -------------------------------------------------------------------------------------

    async def predict(self, body: bytes, content_type: str | None, filename: str | None) -> Answer:
        async def work(deadline: float) -> Answer:
            pipeline = await self.pipeline()
            clip, warnings, skipped = await self.decode(self.parse_and_decode, pipeline, body, content_type, filename,
                                                        deadline=deadline)
            facts = await self.facts()
            answer = {"label": None, "probabilities": None, "warnings": warnings, "backend": facts["backend"],
                      "checkpoint_sha256": facts["checkpoint_sha256"], "batch_size": None}
            if skipped is not None:
                return Answer(200, answer | {"skipped": skipped})
            row = await self.model.classify(clip)
            answer |= {"label": row["label"], "probabilities": row["probabilities"], "batch_size": row["batch_size"]}
            return Answer(200, answer, batch_size=row["batch_size"])

        return await self.admitted(work)

    async def infer(self, model_name: str, body: bytes, header_length: str | None) -> Answer:
        """The Open Inference Protocol's infer (kserve.py)."""
        from . import kserve

        facts = await self.facts()
        self._check_model(model_name)

        async def work(deadline: float) -> Answer:
            request = await self.decode(lambda b, h, stop: kserve.parse_infer(b, h, facts["config"],
                                                                              max_batch=self.options.max_batch),
                                        body, header_length, deadline=deadline)
            if request.clips is not None:
                clips = torch.from_numpy(np.array(request.clips))  # a writable copy of the request's bytes
                clips = clips.float() / 255 if clips.dtype == torch.uint8 else clips.float()
                decoded = [(c, None) for c in clips]
            else:
                pipeline = await self.pipeline()
                decoded = []
                for data in request.videos:
                    upload = parse_upload(data, "application/octet-stream")
                    clip, _, skipped = await self.decode(self.clip_of, pipeline, upload, deadline=deadline)
                    decoded.append((clip, skipped))
            rows = await asyncio.gather(*(self.model.classify(c) for c, skipped in decoded if skipped is None))
            rows = iter(rows)
            k = facts["config"].num_classes
            logits, probs, labels, batch = [], [], [], None
            for _, skipped in decoded:
                if skipped is not None:  # no face: no label, NaN numbers
                    logits.append([float("nan")] * k)
                    probs.append([float("nan")] * k)
                    labels.append("")
                    continue
                row = next(rows)
                logits.append(row["logits"])
                probs.append(list(row["probabilities"].values()))
                labels.append(row["label"])
                batch = row["batch_size"]
            data, headers = kserve.infer_response(self.options.model_name, request, np.array(logits, np.float32),
                                                  np.array(probs, np.float32), labels)
            return Answer(200, data, headers, batch_size=batch)

        return await self.admitted(work)

    def _check_model(self, name: str) -> None:
        if name != self.options.model_name:
            raise UploadError(404, f"no model {name!r}: this server has {self.options.model_name!r}")
