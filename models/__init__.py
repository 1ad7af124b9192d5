"""Sequence mixers with one contract, and the language model that wraps them.

Every mixer takes (d_model, num_heads, head_dim, ...) and provides:
- `forward(x: (B, T, D)) -> (y: (B, T, D), aux_loss or None)`: the parallel form, for training;
- `prefill(x: (B, T, D)) -> (y, state)`: the parallel form plus the decoding state after its last token;
- `init_state(batch, device, dtype)` and `step(x: (B, D), state) -> (y: (B, D), state)`: decoding (the
  memory mixers update their state in place and return it; attention returns a new dict);
- `state_size(seq_len) -> {"total", "active"}`: recurrent state in values, Zoology's convention.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict

import torch.nn as nn

from .attention import Attention
from .config import ModelConfig
from .layers import SwiGLU
from .lm import GraphedDecoder, LanguageModel
from .memory import KINDS, MemoryMixer

MIXERS: Dict[str, Callable[..., nn.Module]] = {
    "attention": Attention,
    "linear_attention": partial(MemoryMixer, kind="linear", num_memories=0),
    "gla": partial(MemoryMixer, kind="gla", num_memories=0),
    "mamba2": partial(MemoryMixer, kind="mamba2", num_memories=0),
    "deltanet": partial(MemoryMixer, kind="delta", num_memories=0),
    "gated_deltanet": partial(MemoryMixer, kind="gated_delta", num_memories=0),
    "mom": MemoryMixer,  # kind from model.memory, memories from model.num_memories
}


def build_mixer(name: str, cfg: ModelConfig) -> nn.Module:
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; known: {', '.join(sorted(MIXERS))}")
    kwargs = dict(d_model=cfg.d_model, num_heads=cfg.num_heads, head_dim=cfg.head_dim, conv_size=cfg.conv_size,
                  chunk_size=cfg.chunk_size)
    if name == "mom":
        kwargs.update(kind=cfg.memory, num_memories=cfg.num_memories, topk=cfg.topk,
                      shared_memory=cfg.shared_memory, aux_loss_coef=cfg.aux_loss_coef)
    return MIXERS[name](**kwargs)


def build_model(cfg: ModelConfig, vocab_size: int) -> LanguageModel:
    """A LanguageModel from a ModelConfig: `pattern` (one mixer per layer) or `mixer` repeated n_layers times."""
    pattern = list(cfg.pattern) if cfg.pattern else [cfg.mixer] * cfg.n_layers
    mlp = partial(SwiGLU, cfg.d_model, cfg.mlp_ratio) if cfg.mlp == "swiglu" else None
    return LanguageModel(vocab_size, cfg.d_model, [build_mixer(n, cfg) for n in pattern], mlp, cfg.embed_dropout)


__all__ = ["MIXERS", "KINDS", "ModelConfig", "build_model", "build_mixer", "GraphedDecoder", "LanguageModel", "MemoryMixer",
           "Attention"]
