"""The embedded server, `stt-fast serve`'s default: one process, the model in it, uvicorn in front.

    client --HTTP--> uvicorn (one event loop: the routes of api.py, service.py's admission and deadlines)
                        |  uploads decoded on the decode pool
                        v
                     DynamicBatcher (batcher.py) --> the model on a thread of its own, one forward pass a batch

Nothing listens beyond the HTTP port (on loopback unless --host asks otherwise). Ray is for clusters
(app.py, `--ray`).
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from .batcher import DynamicBatcher
from .service import ServeOptions, Service, check_options, rows_of

log = logging.getLogger("stt_fast.serving")


class LocalModel:
    """The ModelClient of the embedded server: a predictor in this process behind a DynamicBatcher."""

    def __init__(self, options: ServeOptions, predictor, checkpoint_sha256: str | None) -> None:
        from stt_fast.predict import class_names

        self.predictor = predictor
        self.labels = class_names(predictor.config.num_classes)
        self.batcher = DynamicBatcher(lambda clips: rows_of(self.predictor(clips), self.labels),
                                      max_batch=options.max_batch, batch_wait_ms=options.batch_wait_ms)
        # past their upload: the clip in the pass, max_queue waiting, and a batch's worth decoding
        self.capacity = 2 * options.max_batch + options.max_queue
        config = predictor.config
        self._facts = {"backend": predictor.name, "checkpoint_sha256": checkpoint_sha256,
                       "num_frames": config.num_frames, "image_size": config.image_size, "config": config}

    async def classify(self, clip: torch.Tensor) -> dict:
        return await self.batcher.classify(clip)

    async def facts(self) -> dict:
        return self._facts

    async def readiness(self) -> tuple[bool, dict]:
        return True, {"backend": self._facts["backend"], "passes": self.batcher.passes}


def model_sha256(spec) -> str | None:
    """The hash the answers carry: the model file's, or for an engine the checkpoint's, from its sidecar."""
    from stt_fast.files import sha256_file

    if spec.backend == "tensorrt":
        from stt_fast.export.engine_runtime import read_sidecar

        return read_sidecar(spec.engine).get("checkpoint_sha256")
    return sha256_file(spec.file())


def load_model(options: ServeOptions) -> tuple[object, str | None]:
    """The predictor of options.spec, checked by one probe clip (a model that cannot run fails here, before the
    port opens), and the hash its answers carry."""
    from stt_fast.compiler.cuda_graphs import graph_batch

    predictor = options.spec.load()
    config = predictor.config
    warm_up = getattr(predictor.run, "warm_up", None)  # stt_fast.compile's module: every batch bucket served
    if warm_up is not None:
        warm_up({graph_batch(b) for b in range(1, options.max_batch + 1)})
    probe = predictor(torch.rand(1, config.num_frames, 3, config.image_size, config.image_size))
    if probe.shape != (1, config.num_classes) or not torch.isfinite(probe).all():
        raise RuntimeError(f"the model's probe answer is {list(probe.shape)} with non-finite values")
    return predictor, model_sha256(options.spec)


def build_service(options: ServeOptions, predictor, checkpoint_sha256: str | None) -> Service:
    model = LocalModel(options, predictor, checkpoint_sha256)
    service = Service(options, model)
    batcher = model.batcher
    # requests that will reach the batcher soon: those being read or decoded (for its wait at low load)
    batcher.coming = lambda: service.uploading + service.working - len(batcher.queue) - batcher.in_pass
    return service


class EmbeddedServer:
    """uvicorn on host:port with the service; run() blocks until SIGINT/SIGTERM (uvicorn's graceful shutdown)."""

    def __init__(self, options: ServeOptions, *, host: str = "127.0.0.1", port: int = 8000, predictor=None,
                 checkpoint_sha256: str | None = None) -> None:
        import uvicorn

        from .api import make_api

        check_options(options)
        if predictor is None:
            predictor, checkpoint_sha256 = load_model(options)
        self.service = build_service(options, predictor, checkpoint_sha256)
        app = make_api()
        app.state.service = self.service
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                     timeout_keep_alive=5, lifespan="off", server_header=False)
        self.server = uvicorn.Server(self.config)

    def run(self) -> None:
        self.server.run()
        self.close()

    def start_in_thread(self, timeout_s: float = 30.0) -> threading.Thread:
        """Serve from a thread (uvicorn installs no signal handler off the main thread: the caller stops it);
        returns once the port is open."""
        thread = threading.Thread(target=self.run, name="stt_fast-serve", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the embedded server did not start")
            time.sleep(0.02)
        return thread

    def stop(self, thread: threading.Thread | None = None) -> None:
        self.server.should_exit = True
        if thread is not None:
            thread.join(timeout=30)

    def close(self) -> None:
        self.service.model.batcher.close()
        self.service.decode_pool.shutdown(wait=False, cancel_futures=True)
