"""The config schema, validate(), and the Hydra config tree in conf/."""
import dataclasses

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.types import RunMode
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from mom_bench.config import (ConfigError, DataConfig, ModelConfig, OptimConfig, RunConfig, register_configs,
                              validate)
from mom_bench.models import MIXERS

register_configs()


def composed(*overrides, hydra=False):
    with initialize_config_module(version_base="1.3", config_module="mom_bench.conf"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def run_config(**parts) -> RunConfig:
    return dataclasses.replace(RunConfig(), **parts)


def test_unknown_mixer_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        validate(run_config(model=ModelConfig(mixer="foo")))
    msg = str(err.value)
    assert msg.startswith("model.mixer: unknown mixer 'foo'; known: ")
    assert all(name in msg for name in MIXERS)


@pytest.mark.parametrize("part, changes, key", [
    ("model", dict(pattern=["mom", "bogus"], n_layers=2), "model.pattern"),
    ("model", dict(pattern=["mom", "attention"], n_layers=4), "model.pattern"),
    ("model", dict(d_model=66, num_heads=4), "model.d_model"),
    ("model", dict(d_model=0), "model.d_model"),
    ("model", dict(n_layers=-1), "model.n_layers"),
    ("model", dict(num_heads=0), "model.num_heads"),
    ("model", dict(head_dim=0), "model.head_dim"),
    ("model", dict(mixer="gla", d_model=1024), "model.head_dim"),  # one head of 1024: wider than the kernels
    ("model", dict(pattern=["attention", "mom"], n_layers=2, head_dim=640), "model.head_dim"),
    ("model", dict(num_memories=2, topk=3), "model.topk"),
    ("model", dict(memory="lstm"), "model.memory"),
    ("model", dict(mlp="gelu"), "model.mlp"),
    ("optim", dict(lr=0.0), "optim.lr"),
    ("optim", dict(lr=-1e-3), "optim.lr"),
    ("optim", dict(epochs=0), "optim.epochs"),
    ("optim", dict(early_stop=0.0), "optim.early_stop"),
    ("optim", dict(early_stop=1.5), "optim.early_stop"),
    ("data", dict(train=[]), "data.train"),
    ("data", dict(test=[]), "data.test"),
    ("data", dict(batch_size=0), "data.batch_size"),
    ("data", dict(vocab_size=-5), "data.vocab_size"),
])
def test_validate_names_the_key(part, changes, key):
    base = {"model": ModelConfig(), "optim": OptimConfig(), "data": DataConfig()}[part]
    with pytest.raises(ConfigError, match=f"^{key}"):
        validate(run_config(**{part: dataclasses.replace(base, **changes)}))


def test_validate_device_and_slice_sizes():
    with pytest.raises(ConfigError, match="^device: 'tpu' is not one of auto, cpu, cuda"):
        validate(run_config(device="tpu"))
    cfg = OmegaConf.structured(RunConfig())
    cfg.data.test[0].num_examples = 0
    with pytest.raises(ConfigError, match=r"^data\.test\[0\]\.num_examples"):
        validate(cfg)


def test_defaults_and_every_shipped_model_are_valid():
    validate(RunConfig())
    for name in list(MIXERS) + ["mom_attention"]:
        cfg = composed(f"model={name}")
        validate(cfg)
    hybrid = composed("model=mom_attention").model
    assert list(hybrid.pattern) == ["mom", "mom", "mom", "attention"] and hybrid.n_layers == 4


def test_schema_rejects_wrong_types():
    with pytest.raises(ConfigCompositionException) as err:
        composed("model.d_model=abc")
    assert isinstance(err.value.__cause__, ValidationError)
    with pytest.raises(ConfigCompositionException):
        composed("optim.epochs=many")
    with pytest.raises(ConfigCompositionException):  # not a field of the schema
        composed("model.widht=64")


def test_unknown_group_option():
    with pytest.raises(MissingConfigException, match="model/foo"):
        composed("model=foo")
    with pytest.raises(MissingConfigException, match="sweep/nope"):
        composed("sweep=nope")


def test_data_files_follow_the_protocol():
    for length, n, batch in [(64, 4, 512), (128, 8, 512), (256, 16, 256), (512, 64, 128)]:
        d = composed(f"data=zoology_L{length}").data
        assert [(s.seq_len, s.num_kv_pairs, s.num_examples) for s in d.train] == [(length, n, 100_000)]
        assert [(s.seq_len, s.num_kv_pairs, s.num_examples) for s in d.test] == [(length, n, 3_000)]
        assert d.batch_size == batch
    based = composed("data=based_fig2").data
    assert [(s.seq_len, s.num_kv_pairs) for s in based.test][-2:] == [(512, 128), (1024, 256)]
    assert (based.batch_size, based.test_batch_size) == (256, 32)
    small = composed().data
    assert small.vocab_size > max(s.seq_len for s in small.test)  # MQAR needs V > L


def sweep_grid(name):
    cfg = composed(f"sweep={name}", hydra=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert cfg.hydra.callbacks.sweep._target_ == "mom_bench.sweep.SweepCallback"
    return cfg, {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


def test_sweeps():
    # the default and reduced sweeps keep the project's first seven mixers (README's table comes from them)
    mixers = ["attention", "deltanet", "gated_deltanet", "gla", "linear_attention", "mamba2", "mom"]
    cfg, grid = sweep_grid("zoology_fig2")  # Zoology's architecture: model presets (tests/test_zoology_protocol.py)
    assert sorted(grid["model"]) == [f"zoology_fig2/{m}" for m in ("attention", "base_conv", "based", "deltanet",
                                     "gated_deltanet", "gla", "linear_attention", "mamba2", "mom")]
    assert grid["model.d_model"] == ["64", "128", "256", "512"]
    lrs = [float(v) for v in grid["optim.lr"]]
    assert lrs == pytest.approx([1e-4, 10 ** (-10 / 3), 10 ** (-8 / 3), 1e-2], rel=1e-4)  # logspace(-4, -2, 4)
    assert len(grid["data"]) == 4 and cfg.optim.epochs == 64 and cfg.sweep_name == "zoology_fig2"
    cfg, grid = sweep_grid("based_fig2")
    lrs = [float(v) for v in grid["optim.lr"]]
    assert lrs == pytest.approx([1e-3, 10 ** -2.5, 1e-2, 10 ** -1.5], rel=1e-4)  # logspace(-3, -1.5, 4)
    assert cfg.optim.epochs == 32 and len(cfg.data.train) == 5 and len(cfg.data.test) == 7
    cfg, grid = sweep_grid("zoology_fig2_reduced")
    assert sorted(grid["model"]) == mixers and grid["model.d_model"] == ["64", "128"]
    assert len(grid["optim.lr"]) == 2
    assert cfg.optim.epochs == 16
    for option in grid["data"]:
        d = composed(f"data={option}").data
        assert (d.train[0].num_examples, d.test[0].num_examples) == (20_000, 1_000)
    assert sorted(composed(f"data={o}").data.train[0].seq_len for o in grid["data"]) == [64, 256]
    cfg, grid = sweep_grid("default")
    assert sorted(grid["model"]) == mixers
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.sweep.dir.startswith(cfg.results_dir)  # Hydra's logs beside the records


SLURM_KEYS = {  # hydra-submitit-launcher 1.2 SlurmQueueConf
    "submitit_folder", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes",
    "name", "partition", "qos", "comment", "constraint", "exclude", "gres", "cpus_per_gpu", "gpus_per_task",
    "mem_per_gpu", "mem_per_cpu", "account", "signal_delay_s", "max_num_timeout", "additional_parameters",
    "array_parallelism", "setup"}


def test_optional_launcher_files_use_the_plugins_keys():
    # The plugins are optional extras, not installed here, so the files are checked as YAML.
    from importlib.resources import files

    conf = files("mom_bench.conf") / "launcher"
    slurm = OmegaConf.load(str(conf / "slurm.yaml"))
    assert {"override /hydra/launcher": "submitit_slurm"} in slurm.defaults
    assert set(slurm.hydra.launcher) <= SLURM_KEYS and slurm.hydra.launcher.gpus_per_node == 1
    ray = OmegaConf.load(str(conf / "ray.yaml"))
    assert {"override /hydra/launcher": "ray"} in ray.defaults
    assert set(ray.hydra.launcher) == {"ray"} and set(ray.hydra.launcher.ray) <= {"init", "remote"}
    assert composed("launcher=parallel", hydra=True).hydra.launcher.n_jobs == 2


def test_yaml_files_state_only_what_differs_from_their_schema():
    """A config file that restates its dataclass's default hides which of its values matter, and goes
    stale when the default changes."""
    import dataclasses
    from pathlib import Path

    from omegaconf import OmegaConf

    from mom_bench.config import DataConfig, EvalConfig, ModelConfig, OptimConfig, PretrainConfig, RunConfig

    conf = Path(__file__).resolve().parent.parent / "conf"
    schemas = {"config.yaml": RunConfig, "pretrain.yaml": PretrainConfig, "eval.yaml": EvalConfig,
               **{f"model/{p.name}": ModelConfig for p in (conf / "model").glob("*.yaml")},
               **{f"data/{p.name}": DataConfig for p in (conf / "data").glob("*.yaml")},
               **{f"optim/{p.name}": OptimConfig for p in (conf / "optim").glob("*.yaml")}}

    def restated(values, schema, prefix=""):
        defaults = {f.name: getattr(schema(), f.name) for f in dataclasses.fields(schema)}
        for key, value in (values or {}).items():
            # a model file names its mixer even where it is the default: the file is that mixer
            if key in ("defaults", "hydra", "mixer") or key not in defaults:
                continue
            default = defaults[key]
            if dataclasses.is_dataclass(default) and isinstance(value, dict):
                yield from restated(value, type(default), f"{prefix}{key}.")
            elif value == (dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default):
                yield f"{prefix}{key}"

    found = {name: list(restated(OmegaConf.to_container(OmegaConf.load(conf / name)), schema))
             for name, schema in schemas.items()}
    assert {name: keys for name, keys in found.items() if keys} == {}


def test_required_values_are_named_when_missing():
    from mom_bench.config import EvalConfig, merge_checked

    with pytest.raises(ConfigError, match=r"^checkpoint: required, with no default \(add checkpoint=\.\.\.\)"):
        merge_checked(EvalConfig, {})
    assert merge_checked(EvalConfig, {"checkpoint": "ckpt"}).checkpoint == "ckpt"


@pytest.mark.parametrize("mixer", ["attention", "gated_deltanet", "gla", "mom", "sliding_window", "based"])
def test_heads_set_by_head_dim_need_not_add_up_to_d_model(mixer):
    # 3 heads of 16 on d_model 40: valid once head_dim is given, and the model maps (B, T, 40) to logits
    import torch

    from mom_bench.models import build_model

    cfg = ModelConfig(mixer=mixer, d_model=40, num_heads=3, head_dim=16, embed_dropout=0.0)
    validate(run_config(model=cfg))
    with pytest.raises(ConfigError, match="^model.d_model"):
        validate(run_config(model=dataclasses.replace(cfg, head_dim=None)))
    logits, _ = build_model(cfg, 32)(torch.randint(0, 32, (2, 12)))
    assert logits.shape == (2, 12, 32) and logits.isfinite().all()
