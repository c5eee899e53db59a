"""CUDA graphs captured per batch-size bucket, in a bounded cache, so small batches are not launch-bound.

A graph replays the exact kernels captured for one input shape and dtype. So that variable-batch serving
does not capture a graph per batch size, a batch is run in the graph of the smallest bucket that holds
it (GRAPH_BUCKETS: 1, 2, 4, ..., 64; above that, multiples of 64): its clips fill the first rows of the
graph's static input, the rows after them keep earlier clips (every row of this model is computed
independently of the others), and only the first rows of the static output are returned, as a copy.

Clips are copied once, into the graph's static input: from the CPU through a page-locked staging buffer
(so that the copy is asynchronous), or directly from the device. One lock serialises capture and replay on
the host, and every replay runs on one private stream that first waits for the caller's stream (the clips
are ready) and that the caller's stream then waits for (the output is ready): so two threads calling from
two streams cannot have one's copy into the static input overtake the other's replay or clone on the GPU,
which ordering by each caller's own stream alone did not prevent. All graphs share one memory pool, which
the one-at-a-time order also needs; run one compiled module per stream to overlap.

The cache itself (buckets, least-recently-used eviction, the lock) does not depend on CUDA: ``capture``
is the one CUDA-specific step, and tests exercise the cache on the CPU with a stand-in for it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

Replay = Callable[[torch.Tensor], torch.Tensor]
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def graph_batch(batch: int, buckets: Sequence[int] = GRAPH_BUCKETS) -> int:
    """The batch size of the graph that runs a batch of `batch` clips: the smallest bucket that holds it,
    or above the largest bucket the next multiple of it."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    fitting = [b for b in buckets if b >= batch]
    if fitting:
        return min(fitting)
    largest = max(buckets)
    return -(-batch // largest) * largest


class CudaGraphCapture:
    """capture(example) -> replay(clips): fn captured in a CUDA graph for example's shape and dtype;
    replay takes any batch up to the example's, from the CPU or the device, and returns its rows."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device, warmup: int = 2) -> None:
        self.fn = fn
        self.device = device
        self.warmup = warmup
        self._pool = None
        self._replay_stream = None  # every graph of this module replays on it (module docstring)

    def __call__(self, example: torch.Tensor) -> Replay:
        with torch.cuda.device(self.device):  # capture and replay on the module's device, not the current one
            return self._capture(example)

    def _capture(self, example: torch.Tensor) -> Replay:
        static_in = example.to(self.device, copy=True)
        if self._replay_stream is None:
            self._replay_stream = torch.cuda.Stream(self.device)
        replay_stream = self._replay_stream
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up runs autotuning and allocations outside the graph
            for _ in range(self.warmup):
                self.fn(static_in)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self.fn(static_in)
        staging = torch.empty(static_in.shape, dtype=static_in.dtype, pin_memory=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(self.device))

        def replay(clips: torch.Tensor) -> torch.Tensor:
            with torch.cuda.device(self.device):
                return run(clips)

        def run(clips: torch.Tensor) -> torch.Tensor:
            rows = clips.shape[0]
            caller = torch.cuda.current_stream(self.device)
            replay_stream.wait_stream(caller)  # the clips the caller's stream wrote are ready
            with torch.cuda.stream(replay_stream):
                if clips.device.type == "cpu":
                    copied.synchronize()  # the previous call's copy out of the staging buffer has finished
                    staging[:rows].copy_(clips)
                    static_in[:rows].copy_(staging[:rows], non_blocking=True)
                    copied.record(replay_stream)
                else:
                    static_in[:rows].copy_(clips, non_blocking=True)
                graph.replay()
                out = static_out[:rows].clone()
            caller.wait_stream(replay_stream)  # the caller's next work sees the output
            out.record_stream(caller)  # made on the replay stream, used on the caller's
            return out

        return replay


class GraphCache:
    """clips -> fn(clips) through one captured graph per (batch bucket, clip shape, dtype), at most
    max_graphs kept, least recently used evicted."""

    def __init__(self, capture: Callable[[torch.Tensor], Replay], max_graphs: int = 8,
                 buckets: Sequence[int] = GRAPH_BUCKETS) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.capture = capture
        self.max_graphs = max_graphs
        self.buckets = tuple(buckets)
        self._graphs: OrderedDict[tuple, Replay] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._graphs)

    def cached(self) -> list[tuple]:
        """The cached (graph input shape, dtype) keys, least recently used first."""
        return list(self._graphs)

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        size = graph_batch(clips.shape[0], self.buckets)
        key = ((size, *clips.shape[1:]), clips.dtype)
        with self._lock:
            replay = self._graphs.get(key)
            if replay is None:
                # the example is the first clips, padded with copies of the last one to the bucket's size
                example = torch.cat([clips, clips[-1:].expand(size - clips.shape[0], *clips.shape[1:])])
                replay = self.capture(example)  # a failed capture evicts nothing
                if len(self._graphs) >= self.max_graphs:
                    self._graphs.popitem(last=False)  # least recently used
                self._graphs[key] = replay
            else:
                self._graphs.move_to_end(key)
            return replay(clips)
