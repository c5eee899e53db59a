"""CUDA graphs captured per input shape, in a bounded cache, so small batches are not launch-bound.

A graph replays the exact kernels captured for one batch size and input dtype. Inputs are copied into
the graph's static input buffer and the static output is cloned out, so callers never share memory
with the graph. One lock serialises capture and replay: the compiled module may be called from several
threads. All graphs share one memory pool; the lock also guarantees that no two of them run at once,
which that sharing needs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import torch


class GraphCache:
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 max_graphs: int = 8, warmup: int = 2) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.fn = fn
        self.device = device
        self.max_graphs = max_graphs
        self.warmup = warmup
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._pool = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._graphs)

    def _capture(self, example: torch.Tensor):
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
        return graph, static_in, static_out

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        key = (tuple(clips.shape), clips.dtype)
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                if len(self._graphs) >= self.max_graphs:
                    self._graphs.popitem(last=False)  # least recently used
                entry = self._graphs[key] = self._capture(clips)
            else:
                self._graphs.move_to_end(key)
            graph, static_in, static_out = entry
            static_in.copy_(clips, non_blocking=True)
            graph.replay()
            return static_out.clone()
