"""train(): records, skipping finished runs, failures recorded instead of raised, atomic writes."""
import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch

import mom_bench.models
from mom_bench import files, records, train as T
from mom_bench.config import ConfigError, DataConfig, ModelConfig, OptimConfig, RunConfig, SliceConfig


def tiny(tmp_path, mixer="attention", **optim) -> RunConfig:
    # Two train slices of different lengths: batches must each come from one slice.
    data = DataConfig(vocab_size=40, batch_size=16, test_batch_size=32,
                      train=[SliceConfig(16, 2, 48), SliceConfig(32, 4, 32)],
                      test=[SliceConfig(16, 2, 32), SliceConfig(32, 4, 32)])
    model = ModelConfig(mixer=mixer, d_model=16, num_heads=2, chunk_size=8, embed_dropout=0.0)
    return RunConfig(model=model, data=data, optim=OptimConfig(**{"epochs": 2, **optim}),
                     results_dir=str(tmp_path), progress=False, device="cpu")


def test_tiny_run_writes_a_full_record(tmp_path):
    rec = T.train(tiny(tmp_path, mixer="mom"))
    path = tmp_path / "runs" / f"{rec['run_id']}.json"
    assert json.loads(path.read_text()) == rec
    assert rec["status"] == "complete" and rec["reason"] is None
    assert rec["run_id"].startswith("mom_d16_L16_n2+L32_n4_lr0.001_s123_".replace("+", "-"))
    assert rec["config"]["model"]["mixer"] == "mom" and rec["config"]["results_dir"] == str(tmp_path)
    m = rec["model"]
    assert (m["mixer"], m["d_model"], m["n_layers"]) == ("mom", 16, 2) and m["params"] > 0
    s = m["state_size"]
    assert s["total_bytes"] == 4 * s["total"] and s["active_bytes"] == 4 * s["active"]
    assert s["active"] < s["total"]  # MoM: only the routed top-k memories are active
    assert set(rec["accuracy"]) == {"L16_n2", "L32_n4"}
    assert rec["mean_accuracy"] == pytest.approx(sum(rec["accuracy"].values()) / 2)
    assert 1 <= rec["best_epoch"] <= rec["epochs_run"] == 2 and len(rec["eval_history"]) == 2
    steps = 2 * (3 + 2)  # per epoch: ceil(48/16) + ceil(32/16)
    assert rec["steps"] == steps and rec["loss_curve"][-1][0] == steps
    assert all(math.isfinite(loss) for _, loss in rec["loss_curve"])
    assert rec["train_tokens"] == 2 * (48 * 16 + 32 * 32)
    assert rec["throughput_tokens_per_s"] > 0 and rec["wall_time_s"] >= rec["train_time_s"] > 0
    assert set(rec["hardware"]) == {"device", "device_name", "cpu_count", "torch", "python", "hostname"}
    assert rec["started_at"] <= rec["ended_at"]


def test_complete_run_is_skipped_and_failed_run_retried(tmp_path, monkeypatch, caplog):
    cfg = tiny(tmp_path, epochs=1)
    first = T.train(cfg)

    def must_not_run(*args):
        raise AssertionError("a complete run was trained again")

    monkeypatch.setattr(T, "_run", must_not_run)
    with caplog.at_level(logging.INFO, logger="mom_bench.train"):
        assert T.train(cfg) == first
    assert any("skip" in r.message and first["run_id"] in r.message for r in caplog.records)

    # Only the result-changing keys identify a run: verbosity and the sweep's name do not.
    cfg.progress, cfg.sweep_name = True, "elsewhere"
    assert T.train(cfg) == first
    monkeypatch.undo()

    path = records.record_path(tmp_path, first["run_id"])
    records.write_record(path, {**first, "status": "failed", "reason": "killed"})
    assert T.train(cfg)["status"] == "complete"


def test_nan_loss_fails_the_run_and_the_next_run_still_completes(tmp_path, monkeypatch):
    real_build = mom_bench.models.build_model

    class NaNAfterTwoSteps(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, ids, positions=None):
            self.calls += 1
            logits, aux = self.inner(ids, positions)
            return (logits * float("nan") if self.calls >= 3 else logits), aux

        def state_size(self, seq_len):
            return self.inner.state_size(seq_len)

    monkeypatch.setattr(mom_bench.models, "build_model", lambda cfg, v: NaNAfterTwoSteps(real_build(cfg, v)))
    monkeypatch.setattr(T, "LOSS_POINTS", 2)  # losses checked in windows of 5 steps; the step is still exact
    failed = T.train(tiny(tmp_path))
    monkeypatch.undo()
    assert failed["status"] == "failed" and failed["reason"] == "loss became nan at step 3"
    assert records.load_record(records.record_path(tmp_path, failed["run_id"]))["status"] == "failed"
    # A real divergence, as a sweep with a too-large learning rate produces, is caught the same way.
    diverged = T.train(tiny(tmp_path, lr=1e30))
    assert diverged["status"] == "failed"
    assert diverged["reason"].startswith("loss became") and "at step" in diverged["reason"]
    assert T.train(tiny(tmp_path, lr=3e-3))["status"] == "complete"


def test_other_errors_are_recorded_with_traceback(tmp_path, monkeypatch):
    def broken(cfg, vocab_size):
        raise RuntimeError("mixer exploded")

    monkeypatch.setattr(mom_bench.models, "build_model", broken)
    rec = T.train(tiny(tmp_path))
    assert rec["status"] == "failed" and rec["reason"] == "RuntimeError: mixer exploded"
    assert "mixer exploded" in rec["traceback"] and "Traceback" in rec["traceback"]


def test_invalid_config_raises_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="model.mixer"):
        T.train(tiny(tmp_path, mixer="nope"))
    bad_data = tiny(tmp_path)
    bad_data.data.test = [SliceConfig(16, 5, 8)]  # 4n > L: rejected by the MQAR generator
    with pytest.raises(ConfigError):
        T.train(bad_data)
    assert not (tmp_path / "runs").exists()


def test_early_stop(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "evaluate", lambda model, slices, bs, device, **kw: {s.name: 1.0 for s in slices})
    rec = T.train(tiny(tmp_path, epochs=5, early_stop=0.99))
    assert rec["epochs_run"] == 1 and rec["mean_accuracy"] == 1.0


def test_schedule_warms_up_then_decays_to_zero():
    f = [T._lr_factor(k, warmup=4, total=20) for k in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and f[20] == pytest.approx(0.0)


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = records.record_path(tmp_path, "run")
    first = {"run_id": "run", "status": "failed", "kind": "eval", "n": 1}
    records.write_record(path, first)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(OSError):
        records.write_record(path, {**first, "n": 2})
    monkeypatch.undo()
    assert records.load_record(path) == first
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]
    assert records.load_records(tmp_path) == [first]


def test_logits_only_at_the_query_positions_give_the_full_loss_and_accuracy():
    from mom_bench.models import build_model
    from mom_bench.tasks.mqar import accuracy, mqar

    torch.manual_seed(0)
    model = build_model(ModelConfig(mixer="gla", d_model=16, chunk_size=8, embed_dropout=0.0), 64).eval()
    x, y = mqar(64, 32, 4, 6, seed=3, random_non_queries=True)
    full, _ = model(x)
    inputs, positions, targets = T.supervised(SimpleNamespace(inputs=x, targets=y), torch.device("cpu"))
    picked, _ = model(inputs, positions)
    assert picked.shape == (6, 4, 64) and (targets != -100).all()
    torch.testing.assert_close(picked, full.gather(1, positions[..., None].expand(-1, -1, 64)))
    want = torch.nn.functional.cross_entropy(full.flatten(0, 1), y.flatten(), ignore_index=-100)
    got = torch.nn.functional.cross_entropy(picked.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(got, want)
    assert accuracy(picked, targets) == accuracy(full, y)
    # and every gradient
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b)
