"""Checkpoints: round trip of model and optimizer, atomic saves, clear errors, never unpickling."""
import json

import pytest
import torch

from mom_bench import checkpoint as C
from mom_bench.models import ModelConfig
from mom_bench.models import KINDS, MIXERS, build_model

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


def _edit_config(path, vocab_size=None, **model):
    meta = json.loads((path / "config.json").read_text())
    meta["model"].update(model)
    if vocab_size is not None:
        meta["vocab_size"] = vocab_size
    (path / "config.json").write_text(json.dumps(meta))


def _peak_rss_mb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def test_a_config_that_does_not_fit_its_weights_fails_before_the_model_is_built(tmp_path):
    """vocab_size 16000000 would be a 1 GB embedding here: the header check refuses it first."""
    import shutil
    import time

    cfg, model, _, _ = trained("gated_deltanet")
    good = C.save_checkpoint(tmp_path / "good", model, cfg, vocab_size=VOCAB)
    cases = [
        (dict(vocab_size=16_000_000), ["embed.weight: expected [16000000, 16], found [50, 16]"]),
        (dict(vocab_size=1_000_000_000), ["embed.weight: expected [1000000000, 16], found [50, 16]"]),
        (dict(d_model=32), ["embed.weight: expected [50, 32], found [50, 16]", "(and "]),
        (dict(n_layers=3), ["missing: blocks.2.norm1.weight"]),
        (dict(n_layers=1), ["unexpected: blocks.1.", "(and 7 more)"]),
        (dict(vocab_size=1e9), ["vocab_size 1000000000.0", "positive integer"]),
        (dict(vocab_size="50"), ["vocab_size '50'", "positive integer"]),
        (dict(vocab_size=0), ["vocab_size 0", "positive integer"]),
        (dict(vocab_size=True), ["vocab_size True", "positive integer"]),
        (dict(num_heads=0), ["describes no model"]),
        (dict(head_dim=-1), ["describes no model"]),
    ]
    C.load_checkpoint(good)  # the imports of loading are not what is measured
    for i, (edit, needles) in enumerate(cases):
        path = tmp_path / f"bad{i}"
        shutil.copytree(good, path)
        _edit_config(path, **edit)
        rss, start = _peak_rss_mb(), time.perf_counter()
        with pytest.raises(C.CheckpointError) as caught:
            C.load_checkpoint(path)
        seconds, grown = time.perf_counter() - start, _peak_rss_mb() - rss
        message = str(caught.value)
        assert str(path) in message, (edit, message)
        for needle in needles:
            assert needle in message, (edit, message)
        assert seconds < 2 and grown < 100, (edit, seconds, grown)  # MB; the old way took 1000


def test_weights_that_do_not_fit_the_model_to_resume_are_refused_before_they_are_read(tmp_path, monkeypatch):
    cfg, model, opt, _ = trained("gated_deltanet")
    path = C.save_checkpoint(tmp_path / "ck", model, cfg, vocab_size=VOCAB, optimizer=opt, train_state={"step": 2})
    other = build_model(ModelConfig(mixer="gated_deltanet", d_model=32, num_heads=2, chunk_size=8), VOCAB)

    def not_read(file):
        raise AssertionError(f"{file} was read before its header was checked")

    monkeypatch.setattr(C, "_read_tensors", not_read)
    with pytest.raises(C.CheckpointError, match=r"does not fit the model to resume: wrong shape: "
                                                r"embed.weight: expected \[50, 32\], found \[50, 16\]"):
        C.load_train_state(path, other, torch.optim.AdamW(other.parameters()))


@pytest.mark.parametrize("config", [dict(mixer=m) for m in MIXERS if m != "mom"]
                         + [dict(mixer="mom", memory=k) for k in KINDS]
                         + [dict(mixer="mom", pattern=["mom", "attention"], mlp="swiglu")])
def test_the_shapes_from_the_meta_device_are_those_of_every_real_model(tmp_path, config):
    cfg = ModelConfig(d_model=16, num_heads=2, chunk_size=8, **config)
    model = build_model(cfg, VOCAB)
    path = C.save_checkpoint(tmp_path / "ck", model, cfg, vocab_size=VOCAB)
    loaded = C.load_checkpoint(path)  # passes the check against the meta model's shapes
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.model.state_dict().items())


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
