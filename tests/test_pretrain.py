"""Pretraining: packing, data position, interrupted and resumed runs, DDP, the command line."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mom_bench import checkpoint as C
from mom_bench.config import (ConfigError, ModelConfig, PretrainConfig, PretrainDataConfig, PretrainOptimConfig)
from mom_bench.pretrain import PackedStream, lr_at, pretrain
from mom_bench.tokenizer import load_tokenizer

TOK = load_tokenizer(None)
EOS = TOK.eos_id


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    words = "the memory keeps what the router sends to it and forgets slowly".split()
    for i in range(3):
        (root / f"doc{i}.txt").write_text(" ".join(words[(i + j) % len(words)] for j in range(40 + 15 * i)))
    (root / "more.jsonl").write_text("".join(json.dumps({"text": f"line {i}: " + " ".join(words[i:])}) + "\n"
                                             for i in range(5)))
    return root


def config(out, corpus, mixer="mom", **kw):
    return PretrainConfig(
        model=ModelConfig(mixer=mixer, d_model=16, n_layers=2, num_heads=2, chunk_size=8, embed_dropout=0.1),
        data=PretrainDataConfig(files=str(corpus / "*"), seq_len=24, batch_size=2),
        optim=PretrainOptimConfig(lr=3e-3, max_steps=7, warmup_steps=2, grad_accum=2),
        out_dir=str(out), save_every=3, progress=False, device="cpu", **kw)


def stream_of(docs, seq_len=4, **kw):
    return PackedStream(lambda skip: iter(docs[skip:]), TOK, seq_len, **kw)


def test_documents_are_joined_with_eos_and_cut_into_overlapping_sequences():
    s = stream_of(["abc", "defgh"], seq_len=4)
    flat = TOK.encode("abc") + [EOS] + TOK.encode("defgh") + [EOS]
    first = s.next_batch(2).tolist()
    assert first == [flat[0:5], flat[4:9]]  # neighbours share one token: every token is a target once
    assert s.next_batch(1).tolist() == [flat[8:10] + flat[:3]]  # the source starts again (epoch 2)
    assert s.position()["epoch"] == 1

    # ranks take interleaved sequences of the same stream; together they see what one process sees
    ranks = [stream_of(["abc", "defgh"], rank=r, world_size=2).next_batch(1).tolist()[0] for r in range(2)]
    assert ranks == first


def test_the_data_position_resumes_the_stream_exactly():
    docs = [f"document number {i} " * (i % 3 + 1) for i in range(7)]
    whole = stream_of(docs, seq_len=8)
    expected = [whole.next_batch(3) for _ in range(6)]
    first = stream_of(docs, seq_len=8)
    got = [first.next_batch(3) for _ in range(2)]
    resumed = stream_of(docs, seq_len=8, position=json.loads(json.dumps(first.position())))
    got += [resumed.next_batch(3) for _ in range(4)]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="holds no document"):
        stream_of([]).next_batch(1)


def test_learning_rate_warms_up_then_follows_the_cosine():
    o = PretrainOptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=4, max_steps=104)
    assert [lr_at(s, o) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(54, o) == pytest.approx(0.55) and lr_at(104, o) == pytest.approx(0.1)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, corpus):
    whole = pretrain(config(tmp_path / "whole", corpus))

    class Killed(Exception):
        pass

    def kill_at_5(step, loss):
        if step == 5:  # after the checkpoint of step 3: steps 4 and 5 are lost and redone
            raise Killed

    with pytest.raises(Killed):
        pretrain(config(tmp_path / "cut", corpus), on_step=kill_at_5)
    assert [s for s, _ in C.list_checkpoints(tmp_path / "cut" / "checkpoints")] == [3]
    resumed = pretrain(config(tmp_path / "cut", corpus))

    a = load_file(tmp_path / "whole" / "checkpoints" / "step_00000007" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "step_00000007" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa = load_file(tmp_path / "whole" / "checkpoints" / "step_00000007" / "optimizer.safetensors")
    ob = load_file(tmp_path / "cut" / "checkpoints" / "step_00000007" / "optimizer.safetensors")
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    assert resumed["loss_curve"] == whole["loss_curve"]
    assert whole["loss_curve"][-1][1] < whole["loss_curve"][0][1]  # it learns something
    # a resumed run that is already finished does no more work
    assert pretrain(config(tmp_path / "cut", corpus))["loss_curve"] == whole["loss_curve"]

    # the final checkpoint is an ordinary one: it loads with its tokenizer and training context
    loaded = C.load_checkpoint(tmp_path / "whole")
    assert loaded.tokenizer == "bytes" and loaded.metadata["context_length"] == 24 and loaded.metadata["step"] == 7


def test_bad_data_settings_are_named(tmp_path, corpus):
    cfg = config(tmp_path, corpus)
    cfg.data.dataset = "some/hub-dataset"
    with pytest.raises(ConfigError, match="set exactly one of data.dataset"):
        pretrain(cfg)
    cfg = config(tmp_path, corpus)
    cfg.data.files = str(tmp_path / "nothing*.txt")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        pretrain(cfg)
    cfg = config(tmp_path, corpus)
    cfg.data.files, cfg.data.text_field = str(corpus / "*.jsonl"), "body"
    with pytest.raises(KeyError, match="has no field 'body'"):
        pretrain(cfg)


def test_torchrun_with_two_processes_equals_one_process_with_twice_the_batch(tmp_path, corpus):
    """DDP over gloo: rank r takes sequences j % 2 == r, gradients are averaged, so two ranks with
    batch 1 compute what one process with batch 2 computes. Also runs the command line end to end."""
    args = ["model=gated_deltanet", "model.d_model=16", "model.n_layers=2", "model.mlp=none", "model.chunk_size=8",
            f"data.files={corpus}/*", "data.seq_len=24", "optim.max_steps=3", "optim.warmup_steps=1",
            "save_every=3", "progress=false", "device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=300,
                                      env=env, cwd=tmp_path)
    two = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mom_bench",
              "pretrain", *args, "data.batch_size=1", f"out_dir={tmp_path}/two")
    assert two.returncode == 0, two.stderr[-3000:]
    # the same model as conf/pretrain.yaml with these overrides composes, in this process
    one = PretrainConfig(model=ModelConfig(mixer="gated_deltanet", d_model=16, n_layers=2, num_heads=4, mlp="none",
                                           embed_dropout=0.0, chunk_size=8),
                         data=PretrainDataConfig(files=f"{corpus}/*", seq_len=24, batch_size=2),
                         optim=PretrainOptimConfig(max_steps=3, warmup_steps=1), save_every=3, progress=False,
                         device="cpu", out_dir=str(tmp_path / "one"))
    pretrain(one)
    a = load_file(tmp_path / "one" / "checkpoints" / "step_00000003" / "model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoints" / "step_00000003" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    summary = json.loads((tmp_path / "two" / "pretrain.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "complete"
    assert (two.stdout + two.stderr).count("final checkpoint:") == 1  # rank 0 only
    # ...and a bad override exits with its message, without a traceback
    bad = run("-m", "mom_bench", "pretrain", "model.d_model=abc")
    assert bad.returncode != 0 and "model.d_model" in bad.stderr and "Traceback" not in bad.stderr


def test_the_command_line_ends_with_the_final_checkpoint_on_the_console_and_in_its_log(tmp_path, corpus):
    out = tmp_path / "out"
    args = ["model.d_model=16", "model.n_layers=2", "model.mlp=none", "model.chunk_size=8", f"data.files={corpus}/*",
            "data.seq_len=24", "data.batch_size=2", "optim.max_steps=2", "optim.warmup_steps=1", "save_every=2",
            "progress=false", "device=cpu", f"out_dir={out}"]
    run = subprocess.run([sys.executable, "-m", "mom_bench", "pretrain", *args], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    checkpoint, record = str(out / "checkpoints" / "step_00000002"), str(out / "pretrain.json")
    printed = run.stdout + run.stderr
    assert "pretrain done: 2 steps, final loss " in printed and "tokens/s" in printed
    assert checkpoint in printed and record in printed
    logs = list((out / "hydra").glob("*/pretrain.log"))
    assert len(logs) == 1 and checkpoint in logs[0].read_text()


def test_hub_datasets_are_streamed_and_skipped_without_tokenizing(monkeypatch):
    import datasets

    from mom_bench.pretrain import iter_documents

    calls = []

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_list([{"body": f"doc {i}"} for i in range(5)]).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = PretrainDataConfig(dataset="org/corpus", dataset_config="sample", text_field="body")
    assert list(iter_documents(data, skip=2)) == ["doc 2", "doc 3", "doc 4"]
    assert calls == [("org/corpus", "sample", "train", True)]
    data.text_field = "text"
    with pytest.raises(KeyError, match="no column 'text'"):
        next(iter_documents(data))
