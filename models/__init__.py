"""Sequence mixers with one contract, and the language model that wraps them.

Every mixer takes (d_model, num_heads, head_dim, ...) and provides:
- `forward(x: (B, T, D)) -> (y: (B, T, D), aux_loss or None)`: the parallel form, for training;
- `prefill(x: (B, T, D)) -> (y, state)`: the parallel form plus the decoding state after its last token;
- `init_state(batch, device, dtype)` and `step(x: (B, D), state) -> (y: (B, D), state)`: decoding (the
  memory mixers update their state in place and return it; attention returns a new dict);
- `state_size(seq_len) -> {"total", "active"}`: recurrent state in values, Zoology's convention.

Besides attention and the memory mixers (`memory.py`), Zoology's mixers with published MQAR numbers:
BaseConv (`base_conv.py`: `base_conv` short, `base_conv_long` implicit long convolution), Based's Taylor
linear attention (`based.py`) and sliding-window attention (`sliding_window.py`).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict

import torch.nn as nn

from .attention import Attention
from .base_conv import BaseConv
from .based import Based
from .config import ModelConfig
from .layers import SwiGLU
from .lm import GraphedDecoder, LanguageModel, zoology_init
from .memory import KINDS, MemoryMixer
from .sliding_window import SlidingWindowAttention

MIXERS: Dict[str, Callable[..., nn.Module]] = {
    "attention": Attention,
    "linear_attention": partial(MemoryMixer, kind="linear", num_memories=0),
    "gla": partial(MemoryMixer, kind="gla", num_memories=0),
    "mamba2": partial(MemoryMixer, kind="mamba2", num_memories=0),
    "deltanet": partial(MemoryMixer, kind="delta", num_memories=0),
    "gated_deltanet": partial(MemoryMixer, kind="gated_delta", num_memories=0),
    "kda": partial(MemoryMixer, kind="kda", num_memories=0),
    "retnet": partial(MemoryMixer, kind="retnet", num_memories=0),
    "hedgehog": partial(MemoryMixer, kind="hedgehog", num_memories=0),
    "delta_product": partial(MemoryMixer, kind="delta_product", num_memories=0),
    "mom": MemoryMixer,  # kind from model.memory, memories from model.num_memories
    "base_conv": BaseConv,
    "base_conv_long": partial(BaseConv, long_conv=True),
    "based": Based,
    "sliding_window": SlidingWindowAttention,
}
# The mixers given ModelConfig's block "base_conv, based, sliding_window" (each takes the options it uses)
ZOOLOGY_MIXERS = ("base_conv", "base_conv_long", "based", "sliding_window")


def build_mixer(name: str, cfg: ModelConfig) -> nn.Module:
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; known: {', '.join(sorted(MIXERS))}")
    kwargs = dict(d_model=cfg.d_model, num_heads=cfg.num_heads, head_dim=cfg.head_dim, conv_size=cfg.conv_size,
                  chunk_size=cfg.chunk_size)
    if name == "mom":
        kwargs.update(kind=cfg.memory, num_memories=cfg.num_memories, topk=cfg.topk,
                      shared_memory=cfg.shared_memory, aux_loss_coef=cfg.aux_loss_coef)
    if MIXERS[name] is MemoryMixer or getattr(MIXERS[name], "func", None) is MemoryMixer:  # the memory kinds' options
        kwargs.update(negative_eigenvalues=cfg.negative_eigenvalues, householder_steps=cfg.householder_steps,
                      d_state=cfg.d_state)
    if name == "attention":  # Zoology's MHA options; sliding_window keeps its rotary attention
        kwargs.update(bias=cfg.attn_bias, dropout=cfg.attn_dropout, rotary=cfg.positions == "rotary")
    if name in ZOOLOGY_MIXERS:
        kwargs.update(kernel_size=cfg.base_conv_kernel, l_max=cfg.long_conv_len, feature_dim=cfg.feature_dim,
                      window=cfg.window)
    return MIXERS[name](**kwargs)


def build_model(cfg: ModelConfig, vocab_size: int) -> LanguageModel:
    """A LanguageModel from a ModelConfig: `pattern` (one mixer per layer) or `mixer` repeated n_layers times."""
    pattern = list(cfg.pattern) if cfg.pattern else [cfg.mixer] * cfg.n_layers
    mlp = {"swiglu": partial(SwiGLU, cfg.d_model, cfg.mlp_ratio), "identity": nn.Identity}.get(cfg.mlp)
    positions = cfg.max_positions if cfg.positions == "learned" else 0
    if cfg.positions == "learned" and positions <= 0:  # train.py sets it to the longest input of the run's data
        raise ValueError("learned positions need model.max_positions, the length of their table")
    model = LanguageModel(vocab_size, cfg.d_model, [build_mixer(n, cfg) for n in pattern], mlp, cfg.embed_dropout,
                          norm=cfg.norm, max_positions=positions)
    if cfg.init == "zoology":
        zoology_init(model)
    return model


__all__ = ["MIXERS", "KINDS", "ModelConfig", "build_model", "build_mixer", "GraphedDecoder", "LanguageModel", "MemoryMixer",
           "Attention"]
