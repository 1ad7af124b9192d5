"""Checkpoints: round trip of model and optimizer, atomic saves, clear errors, never unpickling."""
import json

import pytest
import torch

from mom_bench import checkpoint as C
from mom_bench.config import ModelConfig
from mom_bench.models import build_model

VOCAB = 50


def trained(mixer="mom"):
    torch.manual_seed(0)
    cfg = ModelConfig(mixer=mixer, d_model=16, num_heads=2, chunk_size=8, embed_dropout=0.0)
    model = build_model(cfg, VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    ids = torch.randint(0, VOCAB, (2, 12))
    for _ in range(2):
        logits, aux = model(ids)
        (torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()) + aux).backward()
        opt.step()
        opt.zero_grad()
    return cfg, model, opt, ids


def test_round_trip_of_model_optimizer_and_train_state(tmp_path, monkeypatch):
    cfg, model, opt, ids = trained()
    path = C.save_checkpoint(tmp_path / "ck", model, cfg, vocab_size=VOCAB, tokenizer="bytes",
                             metadata={"step": 2}, optimizer=opt, train_state={"step": 2, "data": {"doc": 5}})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "optimizer.safetensors",
                                                      "train_state.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary folder left behind

    def no_unpickling(*args, **kwargs):
        raise AssertionError("checkpoints must not be unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    loaded = C.load_checkpoint(path)
    assert loaded.config == cfg and loaded.vocab_size == VOCAB and loaded.tokenizer == "bytes"
    assert loaded.metadata == {"step": 2} and not loaded.model.training
    torch.testing.assert_close(loaded.model(ids)[0], model.eval()(ids)[0], rtol=0, atol=0)

    fresh = build_model(cfg, VOCAB)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1.0)
    state = C.load_train_state(path, fresh, fresh_opt)
    assert state == {"step": 2, "data": {"doc": 5}}
    want, got = opt.state_dict(), fresh_opt.state_dict()
    assert got["param_groups"] == want["param_groups"] and isinstance(got["param_groups"][0]["betas"], tuple)
    for i, s in want["state"].items():
        for key, value in s.items():
            torch.testing.assert_close(got["state"][i][key], value, rtol=0, atol=0)

    # saving again over an existing checkpoint replaces it
    C.save_checkpoint(path, fresh, cfg, vocab_size=VOCAB, tokenizer="other")
    assert C.load_checkpoint(path).tokenizer == "other" and not (path / "train_state.json").exists()


def test_a_save_killed_midway_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    cfg, model, opt, _ = trained("gated_deltanet")
    path = C.save_checkpoint(tmp_path / "ck", model, cfg, vocab_size=VOCAB, tokenizer="bytes")
    before = (path / "model.safetensors").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "_write_json", killed)  # dies after the weights, before config.json
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(path, model, cfg, vocab_size=VOCAB, optimizer=opt, train_state={"step": 9})
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(tmp_path / "new", model, cfg, vocab_size=VOCAB)
    assert not (tmp_path / "new").exists()


def test_clear_errors_for_missing_and_corrupt_checkpoints(tmp_path):
    cfg, model, opt, _ = trained("gated_deltanet")
    with pytest.raises(C.CheckpointError, match="does not exist"):
        C.load_checkpoint(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(C.CheckpointError, match="is not a folder"):
        C.load_checkpoint(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(C.CheckpointError, match="holds no checkpoint"):
        C.load_checkpoint(tmp_path / "empty")

    good = C.save_checkpoint(tmp_path / "good", model, cfg, vocab_size=VOCAB)

    def broken(name, damage):
        import shutil

        path = tmp_path / name
        shutil.copytree(good, path)
        damage(path)
        return path

    cases = [
        (lambda p: (p / "config.json").unlink(), "config.json is missing"),
        (lambda p: (p / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda p: (p / "config.json").write_text('{"model": {}}'), "not a mom_bench checkpoint"),
        (lambda p: (p / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:100]),
         "model.safetensors cannot be read"),
        (lambda p: _edit_config(p, d_model=32), "does not fit the model"),
        (lambda p: _edit_config(p, mixer="nope"), "describes no model"),
        (lambda p: _edit_config(p, colour="red"), "does not know: \\['colour'\\]"),
    ]
    for i, (damage, message) in enumerate(cases):
        with pytest.raises(C.CheckpointError, match=message):
            C.load_checkpoint(broken(f"bad{i}", damage))
    with pytest.raises(C.CheckpointError, match="cannot resume training"):
        C.load_train_state(good, model, opt)


def _edit_config(path, **model):
    meta = json.loads((path / "config.json").read_text())
    meta["model"].update(model)
    (path / "config.json").write_text(json.dumps(meta))


def test_latest_checkpoint_of_a_run_skips_interrupted_saves_and_prunes(tmp_path):
    cfg, model, _, _ = trained("gated_deltanet")
    root = tmp_path / "run" / "checkpoints"
    for step in (5, 10, 15):
        C.save_checkpoint(C.step_dir(root, step), model, cfg, vocab_size=VOCAB)
    (root / ".step_00000020.abc.tmp").mkdir()  # what a killed save leaves
    (root / "step_00000025").mkdir()  # no config.json: incomplete, not a checkpoint
    assert C.latest_checkpoint(root) == C.step_dir(root, 15)
    assert C.load_checkpoint(tmp_path / "run").path == C.step_dir(root, 15)  # an out_dir means its latest
    C.prune_checkpoints(root, keep_last=2)
    assert [s for s, _ in C.list_checkpoints(root)] == [10, 15]
    assert not (root / ".step_00000020.abc.tmp").exists()
