"""optim=muon: torch.optim.Muon on the blocks' projection matrices, AdamW on the rest; it trains."""
import dataclasses

import pytest
import torch

from mom_bench import train as T
from mom_bench.config import ConfigError, DataConfig, ModelConfig, OptimConfig, RunConfig, SliceConfig, validate
from mom_bench.models import build_model

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon")


def test_parameter_split_is_the_muon_papers():
    m = build_model(ModelConfig(mixer="mom", pattern=["mom", "attention"], n_layers=2, d_model=32, num_heads=2,
                                mlp="swiglu", attn_bias=True, norm="layer", positions="learned", max_positions=16),
                    vocab_size=64)
    matrices, rest = T.muon_split(m)
    muon = {n for n, _ in matrices}
    assert muon == {"blocks.0.mixer.w_q", "blocks.0.mixer.out.weight", "blocks.0.mlp.gate_up.weight",
                    "blocks.0.mlp.down.weight", "blocks.1.mixer.qkv.weight", "blocks.1.mixer.out.weight",
                    "blocks.1.mlp.gate_up.weight", "blocks.1.mlp.down.weight"}
    assert all(p.ndim == 2 for _, p in matrices)
    adamw = {n for n, _ in rest}
    # embeddings (the head is tied to embed), norms, biases, gates, conv taps, decay parameters, fused inputs
    for name in ("embed.weight", "pos.weight", "norm.weight", "norm.bias", "blocks.0.norm1.weight",
                 "blocks.0.mixer.router.weight", "blocks.0.mixer.gate.weight", "blocks.0.mixer.w_in",
                 "blocks.0.mixer.conv.weight", "blocks.0.mixer.A_log" if hasattr(m.blocks[0].mixer, "A_log") else "embed.weight",
                 "blocks.1.mixer.qkv.bias", "blocks.1.mixer.out.bias"):
        assert name in adamw, name
    assert muon.isdisjoint(adamw) and len(muon) + len(adamw) == len(list(m.parameters()))

    opt = T.optimizer(m, OptimConfig(optimizer="muon"), capturable=False)
    kinds = [type(o) for o in opt.optimizers]
    assert kinds == [torch.optim.Muon, torch.optim.AdamW]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(muon) + len(adamw)
    assert opt.optimizers[1].param_groups[0]["betas"] == (0.9, 0.98)  # AdamW keeps optim.betas


def test_muon_trains_a_tiny_mqar(tmp_path):
    data = DataConfig(vocab_size=24, batch_size=32, test_batch_size=128, train=[SliceConfig(16, 2, 512)],
                      test=[SliceConfig(16, 2, 128)])
    model = ModelConfig(mixer="attention", d_model=32, num_heads=2, embed_dropout=0.0)
    cfg = RunConfig(model=model, data=data, optim=OptimConfig(optimizer="muon", epochs=6, lr=1e-2),
                    results_dir=str(tmp_path), progress=False, device="cpu")
    rec = T.train(cfg)
    assert rec["status"] == "complete", rec.get("reason")
    losses = [loss for _, loss in rec["loss_curve"]]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5  # the loss goes down (ln 24 = 3.2 at the start)
    assert rec["mean_accuracy"] > 2 / 24  # above chance over the values
    assert rec["config"]["optim"]["optimizer"] == "muon"


def test_muon_is_a_config_choice():
    with pytest.raises(ConfigError, match="optim.optimizer"):
        validate(dataclasses.replace(RunConfig(), optim=OptimConfig(optimizer="sgd")))
    validate(dataclasses.replace(RunConfig(), optim=OptimConfig(optimizer="muon")))


def test_muon_vs_adamw_sweep_composes():
    from hydra import compose, initialize_config_module

    from mom_bench.config import register_configs

    register_configs()
    with initialize_config_module(version_base="1.3", config_module="mom_bench.conf"):
        cfg = compose("config", overrides=["sweep=muon_vs_adamw"], return_hydra_config=True)
        grid = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
        assert grid["optim"] == ["adamw", "muon"] and len(grid["seed"]) == 3
        assert set(grid["model"]) == {"gated_deltanet", "mom", "attention"}
        cells = []
        for option in grid["data"]:
            (s,) = compose("config", overrides=["sweep=muon_vs_adamw", f"data={option}"]).data.train
            cells.append((s.seq_len, s.num_kv_pairs))
        assert cells == [(256, 64), (512, 128)]
        assert compose("config", overrides=["optim=muon"]).optim.optimizer == "muon"
