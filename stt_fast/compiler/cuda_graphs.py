"""CUDA graphs captured per input shape, in a bounded cache, so small batches are not launch-bound.

A graph replays the exact kernels captured for one batch size and input dtype. Inputs are copied into
the graph's static input buffer and the static output is cloned out, so callers never share memory
with the graph. One lock serialises capture and replay: the compiled module may be called from several
threads. All graphs share one memory pool; the lock also guarantees that no two of them run at once,
which that sharing needs.

The cache itself (least-recently-used eviction, the lock) does not depend on CUDA: ``capture`` is the
one CUDA-specific step, and tests exercise the cache on the CPU with a stand-in for it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

Replay = Callable[[torch.Tensor], torch.Tensor]


class CudaGraphCapture:
    """capture(example) -> replay(clips): fn captured in a CUDA graph for example's shape and dtype."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device, warmup: int = 2) -> None:
        self.fn = fn
        self.device = device
        self.warmup = warmup
        self._pool = None

    def __call__(self, example: torch.Tensor) -> Replay:
        static_in = example.clone()
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

        def replay(clips: torch.Tensor) -> torch.Tensor:
            static_in.copy_(clips, non_blocking=True)
            graph.replay()
            return static_out.clone()

        return replay


class GraphCache:
    """clips -> fn(clips) through one captured graph per (shape, dtype), at most max_graphs kept."""

    def __init__(self, capture: Callable[[torch.Tensor], Replay], max_graphs: int = 8) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.capture = capture
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, Replay] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._graphs)

    def cached(self) -> list[tuple]:
        """The cached (shape, dtype) keys, least recently used first."""
        return list(self._graphs)

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        key = (tuple(clips.shape), clips.dtype)
        with self._lock:
            replay = self._graphs.get(key)
            if replay is None:
                replay = self.capture(clips)  # a failed capture evicts nothing
                if len(self._graphs) >= self.max_graphs:
                    self._graphs.popitem(last=False)  # least recently used
                self._graphs[key] = replay
            else:
                self._graphs.move_to_end(key)
            return replay(clips)
