"""Structured configs: the schema every Hydra config in conf/ is checked against.

Types are checked by OmegaConf when the YAML is merged onto these dataclasses; values that a type cannot
express (known mixer names, ranges, the MQAR constraints) are checked by ``validate``, which raises
``ConfigError`` naming the offending key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""


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
    memory: str = "gated_delta"  # gated_delta | gla | linear
    aux_loss_coef: float = 0.01


@dataclass
class SliceConfig:
    seq_len: int = 64
    num_kv_pairs: int = 4
    num_examples: int = 1000


@dataclass
class DataConfig:
    name: str = "mqar"
    vocab_size: int = 8192
    power_a: float = 0.01
    random_non_queries: bool = False
    train: List[SliceConfig] = field(default_factory=lambda: [SliceConfig(64, 4, 10_000)])
    test: List[SliceConfig] = field(default_factory=lambda: [SliceConfig(64, 4, 1_000)])
    batch_size: int = 64
    test_batch_size: int = 256
    train_seed: int = 0  # train slices use train_seed + i, test slices test_seed + i: disjoint
    test_seed: int = 10_000


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    epochs: int = 8
    warmup_steps: int = 0
    grad_clip: float = 1.0
    early_stop: float = 0.99  # stop once validation accuracy exceeds this


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 123
    device: str = "auto"  # auto | cpu | cuda
    results_dir: str = "outputs"  # run records land under <results_dir>/runs/
    sweep_name: str = "default"
    progress: bool = True
