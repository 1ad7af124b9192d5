"""Router statistics of a model's MoM layers while it is evaluated: the fraction of routed (token, memory)
assignments each memory gets and the router's entropy (the mean over tokens of the entropy of its softmax).

    with router_stats.collect(model) as router:
        evaluate(...)
    router.layers  # one dict per MoM layer: {"module", "memories", "topk", "tokens", "fraction",
                   #                            "entropy", "max_entropy"}

While `collect` is open each routed MemoryMixer has a `router_stats` sink, which its routing fills with
detached sums on the device (no host sync); outside it the attribute is None and routing does nothing
more. A mixer keeps one sink for its lifetime, zeroed in place at each `collect`: an evaluation step
replayed from a CUDA graph (mom_bench.graphs) adds into the buffers it was captured with, so they must stay
the same tensors from one evaluation to the next.
"""
from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Tuple

import torch

_SINKS: "weakref.WeakKeyDictionary[torch.nn.Module, Sink]" = weakref.WeakKeyDictionary()


class Sink:
    """Per-memory assignment counts, the summed router entropy and the token count of one mixer."""

    def __init__(self, memories: int, device: torch.device):
        self.counts = torch.zeros(memories, device=device)
        self.entropy = torch.zeros((), device=device)
        self.tokens = torch.zeros((), device=device)

    def zero_(self) -> None:
        for t in (self.counts, self.entropy, self.tokens):
            t.zero_()

    def add(self, probs: torch.Tensor, index: torch.Tensor) -> None:
        """probs (N, E): the router's softmax; index (N, k): each token's top-k memories."""
        index = index.flatten()
        self.counts.index_add_(0, index, torch.ones_like(index, dtype=self.counts.dtype))
        self.entropy += torch.special.entr(probs.float()).sum()  # -p log p, 0 at p = 0
        self.tokens += probs.shape[0]


class Collection:
    """What `collect` yields; `layers` is filled when the block ends (empty for a model without MoM)."""

    def __init__(self) -> None:
        self.layers: List[Dict[str, Any]] = []


def routed_mixers(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """(module name, mixer) of every MoM layer, in model order."""
    from mom_bench.models import MemoryMixer  # the kernels load with it: not when train.py is imported

    return [(name, m) for name, m in model.named_modules() if isinstance(m, MemoryMixer) and m.routed]


@contextmanager
def collect(model: torch.nn.Module) -> Iterator[Collection]:
    mixers = routed_mixers(model)
    for _, m in mixers:
        if m not in _SINKS:
            _SINKS[m] = Sink(m.routed, m.router.weight.device)
        _SINKS[m].zero_()
        m.router_stats = _SINKS[m]
    result = Collection()
    try:
        yield result
    finally:
        for _, m in mixers:
            m.router_stats = None
    result.layers = [summary(name, m, _SINKS[m]) for name, m in mixers]


def summary(name: str, mixer: torch.nn.Module, sink: Sink) -> Dict[str, Any]:
    """One layer's statistics as plain numbers (one host copy, after the evaluation)."""
    counts = sink.counts.tolist()
    tokens = int(sink.tokens.item())
    slots = sum(counts)
    return {"module": name, "memories": mixer.routed, "topk": mixer.topk, "tokens": tokens,
            "fraction": [c / slots if slots else float("nan") for c in counts],
            "entropy": sink.entropy.item() / tokens if tokens else float("nan"),
            "max_entropy": math.log(mixer.routed)}  # a uniform router's: log E
