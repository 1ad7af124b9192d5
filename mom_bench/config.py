"""Structured configs: the schema every Hydra config in conf/ is checked against.

Types are checked by OmegaConf when the YAML is merged onto these dataclasses; values that a type cannot
express (known mixer names, ranges, the MQAR constraints) are checked by ``validate``, which raises
``ConfigError`` naming the offending key.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from mom_bench.models.config import ModelConfig  # the model part of every schema below


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""


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
    # Zoology's schedule (conf/optim/zoology.yaml) and Muon (conf/optim/muon.yaml)
    schedule: str = "step"  # step: warm-up, then cosine to 0 over the optimizer steps | epoch: Zoology's
    #                         CosineAnnealingLR(T_max=epochs), lr * (1 + cos(pi e / epochs)) / 2 all through
    #                         epoch e = 0, 1, ...: constant within an epoch, no warm-up
    optimizer: str = "adamw"  # adamw | muon (torch.optim.Muon on the blocks' matrices, AdamW on the rest)
    muon_momentum: float = 0.95  # muon: its momentum (Nesterov)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 123
    device: str = "auto"  # auto | cpu | cuda
    results_dir: str = "outputs"  # run records land under <results_dir>/runs/
    sweep_name: str = "single"  # a sweep file names its own
    progress: bool = True
    cuda_graph: bool = True  # on CUDA, replay the train and evaluation steps from CUDA graphs
    reported_epoch: str = "best"  # best | last: the epoch whose accuracy the tables show (Zoology: last);
    #                               records hold both, so this changes the report, not the run


# Values a type cannot express. Kept here, beside the schema, so the two stay in step.
MLP_KINDS = ("none", "identity", "swiglu")
DEVICES = ("auto", "cpu", "cuda")
POSITIONS = ("rotary", "learned", "none")
NORMS = ("rms", "layer")
INITS = ("default", "zoology")
SCHEDULES = ("step", "epoch")
OPTIMIZERS = ("adamw", "muon")
REPORTED_EPOCHS = ("best", "last")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg) -> None:
    """Raise ConfigError naming the first invalid key of a RunConfig (dataclass or DictConfig).

    Runs before any work starts, so a bad sweep point fails in seconds, not after data generation.
    """
    # Imported here: the mixer registry pulls in torch and the kernels, which the schema does not need.
    from mom_bench.kernels import MAX_HEAD_DIM
    from mom_bench.models import KINDS, MIXERS, ZOOLOGY_MIXERS

    known = ", ".join(sorted(MIXERS))
    m, d, o = cfg.model, cfg.data, cfg.optim
    _require(m.mixer in MIXERS, "model.mixer", f"unknown mixer {m.mixer!r}; known: {known}")
    if m.pattern is not None:
        for name in m.pattern:
            _require(name in MIXERS, "model.pattern", f"unknown mixer {name!r}; known: {known}")
        _require(len(m.pattern) == m.n_layers, "model.pattern",
                 f"has {len(m.pattern)} entries but model.n_layers is {m.n_layers}")
    for key in ("d_model", "n_layers", "num_heads", "chunk_size", "num_memories", "topk"):
        _require(getattr(m, key) > 0, f"model.{key}", f"must be positive, got {getattr(m, key)}")
    _require(m.head_dim is None or m.head_dim > 0, "model.head_dim", f"must be positive, got {m.head_dim}")
    _require(m.mlp_ratio > 0, "model.mlp_ratio", f"must be positive, got {m.mlp_ratio}")
    _require(m.conv_size >= 0, "model.conv_size", f"must be >= 0 (0 disables it), got {m.conv_size}")
    _require(0 <= m.embed_dropout < 1, "model.embed_dropout", f"must be in [0, 1), got {m.embed_dropout}")
    # the heads' width is d_model / num_heads unless head_dim sets it (the heads then need not add up to d_model)
    _require(m.head_dim is not None or m.d_model % m.num_heads == 0, "model.d_model",
             f"{m.d_model} is not divisible by model.num_heads={m.num_heads} (or set model.head_dim)")
    _require(m.topk <= m.num_memories, "model.topk", f"{m.topk} exceeds model.num_memories={m.num_memories}")
    _require(m.memory in KINDS, "model.memory", f"{m.memory!r} is not one of {', '.join(sorted(KINDS))}")
    _require(m.householder_steps >= 1, "model.householder_steps", f"must be at least 1, got {m.householder_steps}")
    _require(m.d_state is None or 0 < m.d_state <= MAX_HEAD_DIM, "model.d_state",
             f"must be in [1, {MAX_HEAD_DIM}] (the key dim per head; unset: head_dim), got {m.d_state}")
    # the memory kind of every layer (None for mixers that are not memory mixers)
    kinds = {name: m.memory if name == "mom" else getattr(MIXERS[name], "keywords", {}).get("kind")
             for name in m.pattern or [m.mixer]}
    if m.negative_eigenvalues:  # beta in (0, 2) only means a negative eigenvalue under the delta rule
        for name, kind in kinds.items():
            _require(kind not in KINDS or KINDS[kind].delta, "model.negative_eigenvalues",
                     f"needs delta-rule memories ({', '.join(k for k in KINDS if KINDS[k].delta)}); "
                     f"mixer {name!r} has memory kind {kind!r}")
    _require(m.mlp in MLP_KINDS, "model.mlp", f"{m.mlp!r} is not one of {', '.join(MLP_KINDS)}")
    head_dim = m.head_dim or m.d_model // m.num_heads
    if any(name not in ("attention", *ZOOLOGY_MIXERS) for name in (m.pattern or [m.mixer])):  # core users
        _require(head_dim <= MAX_HEAD_DIM, "model.head_dim",
                 f"{head_dim} (d_model={m.d_model} / num_heads={m.num_heads} unless set) exceeds the "
                 f"{MAX_HEAD_DIM} that the Triton kernels take; raise model.num_heads")
    if any(kind in KINDS and KINDS[kind].feature_map for kind in kinds.values()):  # Hedgehog's 2 * head_dim
        _require(2 * head_dim <= MAX_HEAD_DIM, "model.head_dim",
                 f"Hedgehog's features double it: 2 x {head_dim} exceeds the {MAX_HEAD_DIM} that the Triton "
                 f"kernels take; raise model.num_heads")
    if {"attention", "sliding_window"} & set(m.pattern or [m.mixer]):  # rotary positions rotate pairs of channels
        _require(head_dim % 2 == 0, "model.head_dim",
                 f"attention's rotary positions need an even head dim, got {head_dim} "
                 f"(d_model={m.d_model}, num_heads={m.num_heads})")
    _check_zoology_mixers(m, max(s.seq_len for s in [*d.train, *d.test]) if d.train or d.test else 0, MAX_HEAD_DIM)
    _check_zoology_arch(m, max(s.seq_len for s in [*d.train, *d.test]) if d.train or d.test else 0)

    _require(len(d.train) > 0, "data.train", "needs at least one slice")
    _require(len(d.test) > 0, "data.test", "needs at least one slice")
    for split in ("train", "test"):
        for i, s in enumerate(getattr(d, split)):
            for key in ("seq_len", "num_kv_pairs", "num_examples"):
                value = getattr(s, key)
                _require(value > 0, f"data.{split}[{i}].{key}", f"must be positive, got {value}")
    for key in ("vocab_size", "batch_size", "test_batch_size"):
        _require(getattr(d, key) > 0, f"data.{key}", f"must be positive, got {getattr(d, key)}")

    _require(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _require(o.epochs >= 1, "optim.epochs", f"must be at least 1, got {o.epochs}")
    _require(0 < o.early_stop <= 1, "optim.early_stop", f"must be in (0, 1], got {o.early_stop}")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
             f"must be two values in [0, 1), got {list(o.betas)}")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _require(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables it), got {o.grad_clip}")
    _require(o.schedule in SCHEDULES, "optim.schedule", f"{o.schedule!r} is not one of {', '.join(SCHEDULES)}")
    _require(o.schedule == "step" or o.warmup_steps == 0, "optim.warmup_steps",
             f"the per-epoch schedule has no warm-up (Zoology's has none), got {o.warmup_steps}")
    _require(o.optimizer in OPTIMIZERS, "optim.optimizer", f"{o.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if o.optimizer == "muon":
        import torch

        _require(hasattr(torch.optim, "Muon"), "optim.optimizer",
                 f"muon needs torch.optim.Muon, which torch {torch.__version__} lacks (it came with torch 2.9)")
        _require(0 <= o.muon_momentum < 1, "optim.muon_momentum", f"must be in [0, 1), got {o.muon_momentum}")
    _require(cfg.reported_epoch in REPORTED_EPOCHS, "reported_epoch",
             f"{cfg.reported_epoch!r} is not one of {', '.join(REPORTED_EPOCHS)}")
    _require(cfg.device in DEVICES, "device", f"{cfg.device!r} is not one of {', '.join(DEVICES)}")
    from mom_bench.tasks.mqar import check_mqar_data

    check_mqar_data(d)


def _check_zoology_mixers(m, longest: int, max_head_dim: int) -> None:
    """The options of base_conv, base_conv_long, based and sliding_window, where a layer uses them; `longest`:
    the longest input the model will see."""
    names = set(m.pattern or [m.mixer])
    if "base_conv" in names:
        _require(m.base_conv_kernel >= 1, "model.base_conv_kernel", f"must be at least 1, got {m.base_conv_kernel}")
    if "base_conv_long" in names:  # its filter has taps for long_conv_len positions only
        _require(m.long_conv_len >= max(longest, 1), "model.long_conv_len",
                 f"{m.long_conv_len} is shorter than the longest sequence, {longest}")
    if "based" in names:  # phi's 1 + F + F^2 features are the core's key dim
        features = 1 + m.feature_dim + m.feature_dim ** 2
        _require(m.feature_dim >= 1 and features <= max_head_dim, "model.feature_dim",
                 f"must be at least 1 with 1 + F + F^2 <= {max_head_dim} (the Triton kernels' widest key), got "
                 f"F = {m.feature_dim}")
    if "sliding_window" in names:
        _require(m.window >= 1, "model.window", f"must be at least 1, got {m.window}")


def _check_zoology_arch(m, longest: int) -> None:
    """The options of ModelConfig's block "Zoology's architecture"; `longest`: the longest input."""
    _require(m.positions in POSITIONS, "model.positions", f"{m.positions!r} is not one of {', '.join(POSITIONS)}")
    _require(m.norm in NORMS, "model.norm", f"{m.norm!r} is not one of {', '.join(NORMS)}")
    _require(m.init in INITS, "model.init", f"{m.init!r} is not one of {', '.join(INITS)}")
    _require(0 <= m.attn_dropout < 1, "model.attn_dropout", f"must be in [0, 1), got {m.attn_dropout}")
    _require(m.max_positions >= 0, "model.max_positions", f"must be >= 0 (0: the longest input), got {m.max_positions}")
    if m.positions == "learned" and m.max_positions:  # a position past the table has no embedding
        _require(m.max_positions >= longest, "model.max_positions",
                 f"{m.max_positions} is shorter than the longest sequence, {longest} (0 sizes it to the data)")


def unknown_keys(value: Any, schema: Any, prefix: str = "") -> List[str]:
    """Dotted paths of the keys of a plain `value` (dicts and lists) that the dataclass `schema` does not
    have, each with the closest known key: `optim.learning_rate (did you mean optim.lr?)`."""
    if dataclasses.is_dataclass(schema):
        if not isinstance(value, dict):
            return []
        fields = {f.name: f for f in dataclasses.fields(schema)}
        hints = typing.get_type_hints(schema)
        found = []
        for key, sub in value.items():
            path = f"{prefix}{key}"
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
                hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(fields)})"
                found.append(path + hint)
            else:
                found += unknown_keys(sub, hints[key], path + ".")
        return found
    origin, args = typing.get_origin(schema), typing.get_args(schema)
    if origin is typing.Union:  # Optional[X]
        return [k for a in args if a is not type(None) for k in unknown_keys(value, a, prefix)]
    if origin in (list, List) and isinstance(value, list) and args:
        return [k for i, v in enumerate(value) for k in unknown_keys(v, args[0], f"{prefix}{i}.")]
    return []  # scalars and free dicts (EvalConfig.metadata)


def merge_checked(schema: Any, cfg: Any):
    """`cfg` (a dataclass, dict or DictConfig) merged onto the structured `schema`, refusing keys the
    schema lacks. Hydra lets `+key=value` add keys to any node, so a typo with `+` (`+optim.learning_rate`,
    `+modle=mom`) would otherwise train the defaults and record the typo as if it meant something."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        plain = OmegaConf.to_container(cfg, resolve=False)
    elif dataclasses.is_dataclass(cfg):
        plain = {}
    else:
        plain = cfg
    bad = unknown_keys(plain, schema)
    if bad:
        raise ConfigError(f"unknown key{'s' * (len(bad) > 1)}: {'; '.join(bad)}")
    merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:  # the schema's MISSING values: those a run cannot do without
        raise ConfigError(f"{', '.join(missing)}: required, with no default (add {missing[0]}=...)")
    return merged


def register_configs() -> None:
    """Store the schema in Hydra's ConfigStore; conf/config.yaml lists it first in its defaults, so every
    YAML file and command-line override is merged onto these dataclasses and type-checked."""
    from hydra.core.config_store import ConfigStore

    import mom_bench.sweep  # noqa: F401  registers ${mom_bench_gpus:N}, which conf/launcher/ asks

    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)  # conf/pretrain.yaml
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)  # conf/eval.yaml


# --- pretraining on text and evaluation on real tasks (python -m mom_bench pretrain / eval) -------------
@dataclass
class PretrainDataConfig:
    dataset: Optional[str] = None  # a hub dataset id, streamed (e.g. HuggingFaceFW/fineweb-edu) ...
    dataset_config: Optional[str] = None  # ... its config name (e.g. sample-10BT)
    split: str = "train"
    files: Optional[str] = None  # ... or a glob of local .txt (one document per file) / .jsonl files
    text_field: str = "text"  # the text column of the dataset / the key in each .jsonl line
    tokenizer: Optional[str] = None  # None or "bytes": the offline byte tokenizer; else a hub tokenizer
    seq_len: int = 512  # documents joined with EOS and cut into sequences of this many tokens
    batch_size: int = 16  # sequences per optimizer step and process (times optim.grad_accum)


@dataclass
class PretrainOptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio at max_steps
    warmup_steps: int = 200
    max_steps: int = 10_000
    weight_decay: float = 0.1  # on matrices only; norms, biases and decay parameters are not decayed
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # 0 disables it
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    optim: PretrainOptimConfig = field(default_factory=PretrainOptimConfig)
    out_dir: str = "outputs/pretrain"  # checkpoints/step_*/ and pretrain.json land here
    save_every: int = 1000  # steps between checkpoints; one is always written at the end
    keep_last: int = 3  # checkpoints kept (0 keeps all)
    log_every: int = 10
    resume: bool = True  # continue from the latest checkpoint in out_dir when there is one
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda (under torchrun: the local rank's GPU)
    progress: bool = True


@dataclass
class EvalConfig:
    checkpoint: str = MISSING  # required: a checkpoint folder, or a pretraining out_dir (its latest)
    tasks: List[str] = field(default_factory=lambda: ["jrt_recall"])
    include_path: Optional[str] = None  # None: the installed mom_bench/tasks/recall folder
    include_defaults: bool = True  # also index lm-eval's own tasks (slower start)
    metadata: Dict[str, Any] = field(default_factory=dict)  # task metadata, e.g. recall_data: /data/recall
    limit: Optional[float] = None  # documents per task (a fraction when < 1), for quick runs
    num_fewshot: Optional[int] = None
    batch_size: int = 16
    max_length: int = 2048  # prompts are left-truncated: generation keeps max_length - max_gen_toks tokens
    max_gen_toks: int = 256  # default for tasks that do not set their own
    device: str = "auto"
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16 | float16 | float64
    seed: int = 0
    results_dir: str = "outputs/eval"  # the record lands in <results_dir>/runs/
    log_samples: bool = False  # keep every generation in <results_dir>/samples/<run_id>.json


def validate_pretrain(cfg) -> None:
    """Raise ConfigError naming the first invalid key of a PretrainConfig."""
    # The model checks are validate()'s: run it on a RunConfig whose other parts are valid defaults.
    validate(RunConfig(model=cfg.model))
    from mom_bench.kernels import MAX_HEAD_DIM

    _check_zoology_mixers(cfg.model, cfg.data.seq_len, MAX_HEAD_DIM)  # base_conv_long against the text's length
    d, o = cfg.data, cfg.optim
    _require(bool(d.dataset) != bool(d.files), "data",
             "set exactly one of data.dataset=<hub id> (e.g. HuggingFaceFW/fineweb-edu) or "
             f"data.files=<glob of .txt/.jsonl> (got dataset={d.dataset!r}, files={d.files!r})")
    for key in ("seq_len", "batch_size"):
        _require(getattr(d, key) > 0, f"data.{key}", f"must be positive, got {getattr(d, key)}")
    _require(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    _require(o.max_steps >= 1, "optim.max_steps", f"must be at least 1, got {o.max_steps}")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
             f"must be two values in [0, 1), got {list(o.betas)}")
    _require(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables it), got {o.grad_clip}")
    _require(o.grad_accum >= 1, "optim.grad_accum", f"must be at least 1, got {o.grad_accum}")
    _require(cfg.save_every >= 1, "save_every", f"must be at least 1, got {cfg.save_every}")
    _require(cfg.log_every >= 1, "log_every", f"must be at least 1, got {cfg.log_every}")
    _require(cfg.device in DEVICES, "device", f"{cfg.device!r} is not one of {', '.join(DEVICES)}")


EVAL_DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


def validate_eval(cfg) -> None:
    """Raise ConfigError naming the first invalid key of an EvalConfig."""
    _require(bool(cfg.checkpoint), "checkpoint", "is required: checkpoint=<checkpoint folder or pretrain out_dir>")
    _require(len(cfg.tasks) > 0, "tasks", "needs at least one task or group")
    _require(cfg.limit is None or cfg.limit > 0, "limit", f"must be positive, got {cfg.limit}")
    for key in ("batch_size", "max_length", "max_gen_toks"):
        _require(getattr(cfg, key) > 0, key, f"must be positive, got {getattr(cfg, key)}")
    _require(cfg.dtype in EVAL_DTYPES, "dtype", f"{cfg.dtype!r} is not one of {', '.join(EVAL_DTYPES)}")
