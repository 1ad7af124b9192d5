"""Zoology's protocol: the architecture options (positions, biases, attention dropout, LayerNorm, init, the
identity MLP), the per-epoch cosine, the records' last-epoch accuracy and both state counts, and the sweep
files checked against the numbers of Zoology's own configs (written out below)."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from mom_bench import report, train as T
from mom_bench.config import (ConfigError, DataConfig, ModelConfig, OptimConfig, RunConfig, SliceConfig,
                              register_configs, validate)
from mom_bench.models import MIXERS, build_model
from mom_bench.models.layers import RMSNorm

register_configs()
needs_base_conv = pytest.mark.skipif("base_conv" not in MIXERS, reason="base_conv not registered yet")


def composed(*overrides):
    with initialize_config_module(version_base="1.3", config_module="mom_bench.conf"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def params(cfg):
    """The sweep's grid: {key: [values as strings]}."""
    return {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


# --- Zoology's numbers, read from its code ------------------------------------------------------------
# zoology/experiments/paper_configs/iclr24_zoology_figure2/configs.py (HEAD) and, for the layers the paper's
# runs used, zoology/experiments/paper/figure2.py at 66f4918 (n_layers = 4 unless attention, then 2).
ZOOLOGY_FIG2 = {
    "cells": {64: (4, 512), 128: (8, 512), 256: (16, 256), 512: (64, 128)},  # L: (num_kv_pairs, batch)
    "train_examples": 100_000, "test_examples": 3_000, "vocab": 8_192, "power_a": 0.01,
    "random_non_queries": False, "d_model": [64, 128, 256, 512], "lr": list(np.logspace(-4, -2, 4)),
    "epochs": 64, "layers": {"attention": 2, "other": 4}, "attention_heads": 1, "attention_dropout": 0.1,
}
# zoology/experiments/paper_configs/arxiv24_based_figure2/configs.py (data, batch, lr, epochs) and
# zoology/experiments/models_repo.py (the models, as mqar_example_configs/original_mqar_configs.py runs them
# on the same data): widths and heads per model; every model but Mamba-2 is [BaseConv(kernel 3), mixer].
BASED_FIG2 = {
    "train": [(64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000)],
    "test": [(64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256)], "test_examples": 1_000,
    "batch": 256, "test_batch": 32, "random_non_queries": True, "lr": list(np.logspace(-3, -1.5, 4)), "epochs": 32,
    "models": {  # preset: (sweep file, widths, heads, hybrid with BaseConv)
        "deltanet": ("based_fig2", [64, 128, 256], 2, True),
        "gated_deltanet": ("based_fig2", [64, 128, 256], 2, True),
        "gla": ("based_fig2", [64, 128, 256], 2, True),
        "attention": ("based_fig2_attention", [32, 64, 128], 2, True),
        "based": ("based_fig2_based", [48, 64, 128], 1, True),
        "mamba2": ("based_fig2_mamba2", [64, 128, 256], None, False),
        "sliding_window": ("based_fig2_sliding_window", [128], 1, True),
    },
    "windows": [8, 16, 32, 64, 128, 256, 512, 1024], "based_feature_dims": [8, 16, 24],
    "mamba2_d_states": [8, 16, 24],  # add_mamba2: d_state per width (model.d_state: B and C, q and k here)
}
# zoology/train.py Trainer.fit: AdamW(lr, weight_decay) with torch's default betas, no clipping,
# CosineAnnealingLR(T_max=max_epochs, eta_min=0) stepped after each epoch; weight decay 0.1.
ZOOLOGY_OPTIM = {"betas": [0.9, 0.999], "grad_clip": 0.0, "schedule": "epoch", "weight_decay": 0.1}


def check_optim(cfg):
    o = cfg.optim
    assert (list(o.betas), o.grad_clip, o.schedule, o.weight_decay) == tuple(ZOOLOGY_OPTIM.values())
    assert cfg.reported_epoch == "last"  # Zoology reports the last epoch's accuracy


def test_zoology_fig2_sweep_is_zoologys_figure2():
    cfg = composed("sweep=zoology_fig2")
    grid, z = params(cfg), ZOOLOGY_FIG2
    check_optim(cfg)
    assert cfg.optim.epochs == z["epochs"]
    assert [int(d) for d in grid["model.d_model"]] == z["d_model"]
    assert [float(v) for v in grid["optim.lr"]] == pytest.approx(z["lr"], rel=1e-4)
    cells = {}
    for option in grid["data"]:
        d = composed(f"sweep=zoology_fig2", f"data={option}").data
        (tr,), (te,) = d.train, d.test
        assert (tr.seq_len, tr.num_kv_pairs) == (te.seq_len, te.num_kv_pairs)
        assert (tr.num_examples, te.num_examples) == (z["train_examples"], z["test_examples"])
        assert (d.vocab_size, d.power_a, d.random_non_queries) == (z["vocab"], z["power_a"], z["random_non_queries"])
        cells[tr.seq_len] = (tr.num_kv_pairs, d.batch_size)
    assert cells == z["cells"]
    for preset in grid["model"]:
        m = composed("sweep=zoology_fig2", f"model={preset}").model
        attention = m.mixer == "attention"
        assert m.n_layers == z["layers"]["attention" if attention else "other"]
        assert (m.norm, m.init, m.mlp, m.embed_dropout) == ("layer", "zoology", "identity", 0.1)
        assert m.positions == ("learned" if attention else "none")
        if attention:
            assert (m.num_heads, m.attn_dropout, m.attn_bias) == (z["attention_heads"], z["attention_dropout"], True)


@needs_base_conv
def test_based_fig2_sweeps_are_based_figure2():
    z = BASED_FIG2
    for preset, (sweep, widths, heads, hybrid) in z["models"].items():
        cfg = composed(f"sweep={sweep}")
        grid = params(cfg)
        assert f"based_fig2/{preset}" in grid["model"] and cfg.sweep_name == "based_fig2"
        check_optim(cfg)
        assert cfg.optim.epochs == z["epochs"]
        assert [float(v) for v in grid["optim.lr"]] == pytest.approx(z["lr"], rel=1e-4)
        assert [int(v) for v in grid["model.d_model"]] == widths
        d = cfg.data
        assert [(s.seq_len, s.num_kv_pairs, s.num_examples) for s in d.train] == z["train"]
        assert [(s.seq_len, s.num_kv_pairs) for s in d.test] == z["test"]
        assert {s.num_examples for s in d.test} == {z["test_examples"]}
        assert (d.batch_size, d.test_batch_size, d.random_non_queries) == (z["batch"], z["test_batch"], True)
        m = composed(f"sweep={sweep}", f"model=based_fig2/{preset}").model
        assert m.n_layers == 2 and (m.norm, m.init, m.mlp, m.positions) == ("layer", "zoology", "identity", "none")
        assert list(m.pattern or []) == (["base_conv", preset] if hybrid else [])
        if hybrid:
            assert m.base_conv_kernel == 3
        if heads is not None:
            assert m.num_heads == heads
    assert [int(w) for w in params(composed("sweep=based_fig2_sliding_window"))["model.window"]] == z["windows"]
    # Based's feature dims: Zoology's, less those whose 1 + F + F^2 features pass the kernels' 512 keys
    dims = [int(f) for f in params(composed("sweep=based_fig2_based"))["model.feature_dim"]]
    assert dims == [f for f in z["based_feature_dims"] if 1 + f + f * f <= 512]
    assert [int(n) for n in params(composed("sweep=based_fig2_mamba2"))["model.d_state"]] == z["mamba2_d_states"]
    assert composed("sweep=based_fig2", "model=based_fig2/gla").model.conv_size == 0  # GLA: use_short_conv False


@needs_base_conv
@pytest.mark.parametrize("sweep", ["zoology_fig2", "based_fig2", "based_fig2_attention", "based_fig2_based",
                                   "based_fig2_mamba2", "based_fig2_sliding_window"])
def test_every_model_of_the_zoology_sweeps_validates_at_its_extremes(sweep):
    grid = params(composed(f"sweep={sweep}"))
    extra = [f"{k}={v[-1]}" for k, v in grid.items() if k not in ("model", "model.d_model", "data")]
    for preset in grid["model"]:
        for d_model in (grid["model.d_model"][0], grid["model.d_model"][-1]):
            data = [f"data={grid['data'][-1]}"] if "data" in grid else []
            cfg = composed(f"sweep={sweep}", f"model={preset}", f"model.d_model={d_model}", *data, *extra)
            T.load_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))


# --- the architecture options, numerically --------------------------------------------------------------
def model(**kw):
    return build_model(ModelConfig(**{"mixer": "attention", "d_model": 32, "num_heads": 2, "embed_dropout": 0.0,
                                      "max_positions": 24, **kw}), vocab_size=50)


def test_layer_norm_option_computes_layer_norm():
    m = model(norm="layer")
    norms = [b.norm1 for b in m.blocks] + [m.norm]
    assert all(isinstance(n, nn.LayerNorm) and n.bias is not None and n.eps == 1e-5 for n in norms)
    x = torch.randn(3, 32) * 4 + 2
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 2)
        m.norm.bias.uniform_(-1, 1)
    ref = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(m.norm(x), ref * m.norm.weight + m.norm.bias)
    assert isinstance(model().norm, RMSNorm)  # the default stays


def test_learned_positions_make_outputs_depend_on_position():
    # One token repeated: attention without positions (or with rotary: the values are all equal) gives every
    # position the same output; learned absolute positions do not.
    x = torch.full((1, 24), 7)
    for positions in ("none", "rotary"):
        logits, _ = model(positions=positions).eval()(x)
        torch.testing.assert_close(logits[0], logits[0, :1].expand_as(logits[0]))
    m = model(positions="learned").eval()
    assert m.pos.weight.shape == (24, 32)  # max_positions 0: up to the longest input
    logits, _ = m(x)
    assert (logits[0, 1:] - logits[0, :1]).abs().amax() > 1e-3
    assert not m.blocks[0].mixer.rotary  # learned positions replace rotary, as in Zoology
    assert model(positions="learned", max_positions=40).pos.weight.shape[0] == 40
    with pytest.raises(ValueError, match="longer than the 24 learned positions"):
        m(torch.zeros(1, 25, dtype=torch.long))


def test_attention_biases_and_dropout():
    m = model(attn_bias=True, attn_dropout=0.5)
    att = m.blocks[0].mixer
    assert att.qkv.bias.shape == (96,) and att.out.bias.shape == (32,)
    assert model().blocks[0].mixer.qkv.bias is None
    x = torch.randint(0, 50, (2, 16))
    m.train()
    torch.manual_seed(0)
    a, _ = m(x)
    b, _ = m(x)
    assert (a - b).abs().amax() > 1e-4  # the attention weights are dropped at random while training
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0])
    plain = model().train()
    torch.testing.assert_close(plain(x)[0], plain(x)[0])


def test_identity_mlp_adds_its_norm_as_zoologys_block():
    m = model(mlp="identity", norm="layer")
    block = m.blocks[0]
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        block.norm2.weight.uniform_(0.5, 2)
        h = x + block.mixer(block.norm1(x))[0]
        torch.testing.assert_close(block(x)[0], h + block.norm2(h))  # Zoology: residual + norm2(residual)
        assert model(mlp="none").blocks[0].norm2 is None


def test_zoology_init_stds():
    torch.manual_seed(0)
    m = build_model(ModelConfig(mixer="attention", pattern=["attention", "gated_deltanet"], n_layers=2,
                                d_model=256, num_heads=2, mlp="swiglu", attn_bias=True, init="zoology",
                                positions="learned", max_positions=64), vocab_size=4096)
    att, mem = m.blocks[0].mixer, m.blocks[1].mixer
    scaled = 0.02 / math.sqrt(2 * 2)
    for p, std in [(m.embed.weight, 0.02), (m.pos.weight, 0.02), (att.qkv.weight, 0.02), (att.out.weight, scaled),
                   (m.blocks[0].mlp.down.weight, scaled), (m.blocks[0].mlp.gate_up.weight, 0.02),
                   (mem.w_in, 0.02), (mem.w_q, 0.02), (mem.out.weight, 0.02)]:
        assert p.std().item() == pytest.approx(std, rel=0.05) and abs(p.mean().item()) < std / 10
    assert att.qkv.bias.abs().max() == 0 and att.out.bias.abs().max() == 0
    default = build_model(ModelConfig(mixer="attention", d_model=256, num_heads=2), vocab_size=64)
    # PyTorch's Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): std 1 / sqrt(3 * 256)
    assert default.blocks[0].mixer.out.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 256), rel=0.05)


def test_per_epoch_cosine_is_torchs_cosine_annealing_stepped_per_epoch():
    epochs, per_epoch = 5, 3
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.0)
    step = 0
    for epoch in range(epochs):
        for _ in range(per_epoch):  # constant within the epoch
            assert T._lr_factor(step, 0, epochs * per_epoch, "epoch", epoch, epochs) == pytest.approx(
                opt.param_groups[0]["lr"])
            step += 1
        opt.step()
        sched.step()
    assert T._lr_factor(0, 0, 10) == 1.0 and T._lr_factor(9, 0, 10) < 0.03  # per step: the default


def test_config_checks_the_new_options():
    for part, bad, match in [("model", {"norm": "batch"}, "model.norm"), ("model", {"positions": "alibi"}, "model.positions"),
                             ("model", {"init": "xavier"}, "model.init"), ("model", {"attn_dropout": 1.0}, "model.attn_dropout"),
                             ("model", {"positions": "learned", "max_positions": 8}, "model.max_positions"),
                             ("optim", {"schedule": "linear"}, "optim.schedule"),
                             ("optim", {"schedule": "epoch", "warmup_steps": 10}, "optim.warmup_steps")]:
        base = RunConfig()
        cfg = dataclasses.replace(base, **{part: dataclasses.replace(getattr(base, part), **bad)})
        with pytest.raises(ConfigError, match=match):
            validate(cfg)
    with pytest.raises(ConfigError, match="reported_epoch"):
        validate(dataclasses.replace(RunConfig(), reported_epoch="first"))


# --- records and tables ----------------------------------------------------------------------------------
def tiny(tmp_path, **kw):
    data = DataConfig(vocab_size=40, batch_size=16, test_batch_size=32, train=[SliceConfig(16, 2, 64)],
                      test=[SliceConfig(16, 2, 32), SliceConfig(32, 4, 32)])
    m = ModelConfig(mixer="gla", pattern=["base_conv", "gla"], d_model=16, num_heads=2, chunk_size=8, norm="layer",
                    init="zoology", mlp="identity", positions="none", conv_size=0)
    o = OptimConfig(epochs=3, betas=[0.9, 0.999], grad_clip=0.0, schedule="epoch", lr=3e-3)
    return RunConfig(model=m, data=data, optim=o, results_dir=str(tmp_path), progress=False, device="cpu", **kw)


@needs_base_conv
def test_records_keep_the_last_epoch_and_both_state_counts(tmp_path):
    rec = T.train(tiny(tmp_path / "a", reported_epoch="last"))
    assert rec["status"] == "complete", rec.get("reason")
    last = rec["eval_history"][-1]
    assert rec["last_accuracy"] == last["accuracy"] and rec["last_mean_accuracy"] == last["mean"]
    best = max(rec["eval_history"], key=lambda h: h["mean"])
    assert rec["mean_accuracy"] == best["mean"]
    s = rec["model"]["state_size"]
    conv, gla = s["per_mixer"]["base_conv"], s["per_mixer"]["gla"]
    assert conv["total"] == 16 * 3  # Zoology's short convolution: d_model x kernel taps
    assert gla["total"] == 2 * 8 * 8  # heads x head_dim x head_dim
    assert s["total"] == conv["total"] + gla["total"] and s["total_bytes"] == 4 * s["total"]  # summed over layers
    assert gla["bytes"] == 4 * gla["total"]
    # The same run with the best epoch reported: one run id (reported_epoch changes the report only).
    other = tiny(tmp_path / "b", reported_epoch="best")
    assert T.records.run_id(T.load_config(other)[0]) == rec["run_id"]

    # The tables show the epoch the config names and say which; both means are columns.
    res = report.load(tmp_path / "a")
    row = res.runs.iloc[0]
    assert row["mean"] == pytest.approx(rec["last_mean_accuracy"]) and row["epoch"] == "last"
    assert row["mean_best_epoch"] == pytest.approx(rec["mean_accuracy"])
    assert row["state_total_bytes"] == s["total_bytes"] and row["state_mixer_bytes"] == gla["bytes"]
    md = report.markdown(res)
    assert "Accuracy at the last epoch." in md and "mixer bytes" in md
