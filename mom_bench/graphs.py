"""CUDA graph replay of a whole step (`Replay`): the MQAR train and evaluation steps are small enough that
launching their few hundred kernels one by one from Python costs more than running them, so on CUDA each
step is captured once per input shape and replayed.

A function is replayable when it reads and writes only tensors (inputs copied into static buffers, the
model's parameters, gradients and optimizer state updated in place), never waits for the GPU (no
`.item()`, no host copy of a device tensor) and keeps no Python-side state that changes per call. Its
first `warmup` calls of a shape run eagerly: they initialise the optimizer's state and gradients,
compile and tune the Triton kernels, and warm the allocator, all of which a capture cannot do.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Tuple

import torch

log = logging.getLogger(__name__)

Tensor = torch.Tensor


class Replay:
    """`fn(*inputs) -> Tensor`, eager or replayed from a CUDA graph per input shape.

    Every call returns a fresh tensor (a copy of the graph's output buffer). If a capture fails, the
    reason is logged once and `fn` runs eagerly from then on: never a silently wrong replay."""

    def __init__(self, fn: Callable[..., Tensor], enabled: bool, name: str, warmup: int = 3):
        self.fn, self.enabled, self.name, self.warmup = fn, enabled, name, warmup
        self.calls: Dict[Tuple, int] = {}
        self.graphs: Dict[Tuple, Tuple[torch.cuda.CUDAGraph, Tuple[Tensor, ...], Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if enabled else None  # one pool for every shape's graph

    def __call__(self, *inputs: Tensor) -> Tensor:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        self.calls[key] = self.calls.get(key, 0) + 1
        if not self.enabled or self.calls[key] <= self.warmup:
            return self.fn(*inputs)
        entry = self.graphs.get(key) or self._capture(key, inputs)
        if entry is None:
            return self.fn(*inputs)
        graph, static, out = entry
        for buffer, t in zip(static, inputs):
            buffer.copy_(t)
        graph.replay()
        return out.clone()

    def _capture(self, key, inputs) -> Optional[Tuple[torch.cuda.CUDAGraph, Tuple[Tensor, ...], Tensor]]:
        static = tuple(t.clone() for t in inputs)
        graph = torch.cuda.CUDAGraph()
        try:
            # A capture records the kernels without running them: this call's work is done by the replay.
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.fn(*static)
        except Exception as exc:  # noqa: BLE001 -- an op that cannot be captured: eager from now on
            log.warning("%s: CUDA graph capture failed, running eagerly (%s: %s)", self.name,
                        type(exc).__name__, exc)
            self.enabled = False
            torch.cuda.synchronize()
            return None
        self.graphs[key] = (graph, static, out)
        return self.graphs[key]
