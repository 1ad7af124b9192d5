"""The model's configuration: every mixer and the language model around it are built from one of these
(`mom_bench.models.build_model`). Its values are checked, with the rest of a run's config, by
`mom_bench.config.validate`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional


@dataclass
class ModelConfig:
    mixer: str = "gated_deltanet"  # one of mom_bench.models.MIXERS
    d_model: int = 64
    n_layers: int = 2
    num_heads: int = 1
    head_dim: Optional[int] = None  # default d_model // num_heads
    pattern: Optional[List[str]] = None  # per-layer mixers for hybrids, e.g. [mom, mom, mom, attention]
    mlp: str = "none"  # none (Zoology) | swiglu
    mlp_ratio: float = 4.0
    embed_dropout: float = 0.1
    conv_size: int = 4  # short convolution before the recurrence; 0 disables it
    chunk_size: int = 64
    # MoM only
    num_memories: int = 4
    topk: int = 2
    shared_memory: bool = True
    memory: str = "gated_delta"  # a kind of mom_bench.models.KINDS: gated_delta, delta, gla, mamba2, linear
    aux_loss_coef: float = 0.01
