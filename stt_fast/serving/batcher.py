"""Dynamic batching for the embedded server: clips of concurrent requests share forward passes, with no fixed
wait at low load.

One model, one thread that runs it (the event loop never blocks on a forward pass). The rule:
- the model idle, a clip arrives: it goes at once, in a batch of its own, unless more requests are already
  being read or decoded (the service says how many: `coming`); then the batch waits for them, at most
  batch_wait_ms, and at most until it holds max_batch clips;
- the model busy: arriving clips queue; when the pass ends, up to max_batch of them go together at once.
So a lone client pays one forward pass and nothing else, and under load the batch grows with the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch


class DynamicBatcher:
    """await batcher.classify(clip) -> one row of run(torch.stack(clips)) (run: clips [B, ...] -> rows, one per
    clip, each a dict); rows carry "batch_size", the size of the pass the clip rode in."""

    def __init__(self, run: Callable[[torch.Tensor], list[dict]], *, max_batch: int = 16,
                 batch_wait_ms: float = 5.0, coming: Callable[[], int] = lambda: 0) -> None:
        if max_batch < 1 or batch_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and batch_wait_ms >= 0, got {max_batch}, {batch_wait_ms}")
        self.run, self.max_batch, self.batch_wait_s, self.coming = run, max_batch, batch_wait_ms / 1e3, coming
        self.queue: list[tuple[torch.Tensor, asyncio.Future]] = []
        self.busy = False
        self.in_pass = 0  # clips in the forward pass running now
        self.passes = 0
        self.arrived: asyncio.Event | None = None  # made on the event loop, at the first clip
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stt_fast-model")
        self._worker: asyncio.Task | None = None
        self._stopped = threading.Event()

    async def classify(self, clip: torch.Tensor) -> dict:
        if self._stopped.is_set():
            raise RuntimeError("the model is stopping")
        if self._worker is None:
            self.arrived = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._serve())
        future = asyncio.get_running_loop().create_future()
        self.queue.append((clip, future))
        self.arrived.set()
        try:
            return await future
        except asyncio.CancelledError:  # the caller gave up (timeout): its clip leaves the queue if still there
            self.queue[:] = [(c, f) for c, f in self.queue if f is not future]
            raise

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopped.is_set():
            if not self.queue:
                self.arrived.clear()
                await self.arrived.wait()
                continue
            deadline = time.monotonic() + self.batch_wait_s
            while len(self.queue) < self.max_batch and self.coming() > 0 and time.monotonic() < deadline:
                self.arrived.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.arrived.wait(), timeout=max(0.0, deadline - time.monotonic()))
            batch, self.queue[:] = self.queue[:self.max_batch], self.queue[self.max_batch:]
            batch = [(c, f) for c, f in batch if not f.done()]
            if not batch:
                continue
            self.busy, self.in_pass = True, len(batch)
            try:
                rows = await loop.run_in_executor(self._thread, self.run, torch.stack([c for c, _ in batch]))
                error = None
            except Exception as e:  # the pass failed: every clip in it gets the error
                rows, error = None, e
            finally:
                self.busy, self.in_pass = False, 0
                self.passes += 1
            for i, (_, future) in enumerate(batch):
                if future.done():
                    continue
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(rows[i] | {"batch_size": len(batch)})

    def close(self) -> None:
        self._stopped.set()
        if self.arrived is not None:
            self.arrived.set()
        self._thread.shutdown(wait=False, cancel_futures=True)
