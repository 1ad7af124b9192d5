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
    mlp: str = "none"  # none | identity (Zoology's nn.Identity: the block still adds norm2(x)) | swiglu
    mlp_ratio: float = 4.0
    embed_dropout: float = 0.1
    conv_size: int = 4  # short convolution before the recurrence; 0 disables it
    chunk_size: int = 64
    # MoM only
    num_memories: int = 4
    topk: int = 2
    shared_memory: bool = True
    memory: str = "gated_delta"  # a kind of mom_bench.models.KINDS (gated_delta, delta, kda, delta_product, gla, ...)
    aux_loss_coef: float = 0.01
    # the memory kinds' options
    negative_eigenvalues: bool = False  # beta = 2 sigmoid in (0, 2) instead of (0, 1); delta-rule kinds only
    householder_steps: int = 2  # DeltaProduct (mixer or memory delta_product): delta-rule steps per token
    d_state: Optional[int] = None  # the key dim per head (q and k; Mamba-2's B and C): a state of d_state x head_dim
    #                                per head; default head_dim (head_dim x head_dim)
    # base_conv, based, sliding_window
    base_conv_kernel: int = 3  # base_conv: taps of its short convolution (3 in Zoology's Based figure 2)
    long_conv_len: int = 1024  # base_conv_long: positions its filter spans (Zoology's l_max), >= the longest input
    feature_dim: int = 16  # based: per-head q/k channels before the Taylor map (1 + F + F^2 features)
    window: int = 64  # sliding_window: keys each position sees, itself included
    # Zoology's architecture (conf/model/zoology_arch.yaml and the presets that include it): each default is
    # this project's own choice; models.lm and models.attention say what the other values compute
    positions: str = "rotary"  # rotary (attention rotates q and k) | learned (absolute embeddings added to
    #                            the tokens, attention without rotary) | none (neither)
    max_positions: int = 0  # learned: rows of the position table; 0 = the longest input of the run's data
    norm: str = "rms"  # rms | layer (nn.LayerNorm, bias and eps 1e-5): the blocks' and the final norm
    attn_bias: bool = False  # attention: biases on the QKV and output projections
    attn_dropout: float = 0.0  # attention: dropout on the attention weights while training
    init: str = "default"  # default | zoology (models.lm.zoology_init)
