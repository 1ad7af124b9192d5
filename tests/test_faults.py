"""Faults and bad input: typos, failures that must exit non-zero, bad records, work done twice, results
that must not be lost, file permissions."""
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mom_bench import claims, files, records, report
from mom_bench import train as T
from mom_bench.config import ConfigError
from test_cli import TINY, cli
from test_report import mqar_record
from test_train import tiny


# ------------------------------------------------------------------------------------ unknown keys
def test_unknown_keys_are_refused_with_the_closest_known_one(tmp_path):
    base = {"results_dir": str(tmp_path), "progress": False}
    with pytest.raises(ConfigError, match=r"optim\.lrr \(did you mean optim\.lr\?\)"):
        T.load_config({**base, "optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match=r"modle \(did you mean model\?\)"):
        T.load_config({**base, "modle": "mom"})
    with pytest.raises(ConfigError, match=r"data\.train\.0\.seq_length \(did you mean data\.train\.0\.seq_len\?\)"):
        T.load_config({**base, "data": {"train": [{"seq_length": 64}]}})
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("typo, named", [("+optim.learning_rate=0.1", "optim.learning_rate"),
                                         ("+modle=mom", "modle (did you mean model?)")])
def test_a_typo_with_plus_fails_on_the_command_line(tmp_path, typo, named):
    out = cli("train", *TINY, f"results_dir={tmp_path}", typo, cwd=tmp_path)
    assert out.returncode == 1 and named in out.stderr and "Traceback" not in out.stderr
    assert not list(tmp_path.glob("runs/*.json"))


# ------------------------------------------------------------------------------------- exit status
def test_a_failed_run_exits_non_zero(tmp_path):
    out = cli("train", *TINY, f"results_dir={tmp_path}", "optim.lr=1e30", cwd=tmp_path)
    assert out.returncode == 1 and "loss became nan" in out.stderr and "Traceback" not in out.stderr
    [path] = tmp_path.glob("runs/*.json")
    assert json.loads(path.read_text())["status"] == "failed"


def test_an_odd_attention_head_dim_is_refused_before_any_work(tmp_path):
    out = cli("train", *TINY, f"results_dir={tmp_path}", "model=attention", "model.d_model=34",
              "model.num_heads=2", cwd=tmp_path)
    assert out.returncode == 1 and "even head dim, got 17" in out.stderr
    assert not list(tmp_path.glob("runs/*.json"))


def test_cuda_without_cuda_is_a_failed_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    rec = T.train(dataclasses.replace(tiny(tmp_path), device="cuda"))
    assert rec["status"] == "failed" and "CUDA is not available" in rec["reason"]


def test_an_unwritable_report_fails_and_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    mqar_record(tmp_path, "zoo", "gla", 64, 1e-3, 1, [0.5, 0.5])
    out = tmp_path / "zoo" / "report"
    report.write_report(tmp_path / "zoo", execute=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    mqar_record(tmp_path, "zoo", "gla", 128, 1e-3, 1, [0.9, 0.9])

    real = report.write_tables

    def disk_full(res, folder):
        real(res, folder)
        (folder / "table.csv").write_text("")  # what a full disk leaves ...
        raise OSError(28, "No space left on device")  # ... and says

    monkeypatch.setattr(report, "write_tables", disk_full)
    assert report.main([str(tmp_path / "zoo"), "--no-execute"]) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in (tmp_path / "zoo").iterdir() if p.name.startswith(".")]  # no temporary left


# ---------------------------------------------------------------------------------------- records
BAD = {"list.json": "[1, 2]", "truncated.json": '{"run_id": "x", "status": "compl',
       "noconfig.json": json.dumps({"run_id": "noconfig", "status": "complete"}),
       "kind.json": json.dumps({"run_id": "kind", "status": "complete", "kind": "mqarr"}),
       "types.json": None}


def test_bad_records_are_named_set_aside_and_listed(tmp_path, caplog):
    good = mqar_record(tmp_path, "zoo", "gla", 64, 1e-3, 1, [0.5, 0.5])
    typed = {**good, "run_id": "types", "accuracy": {"L64_n4": "high"}}
    runs = tmp_path / "zoo" / "runs"
    for name, text in BAD.items():
        (runs / name).write_text(text if text is not None else json.dumps(typed))
    valid, bad = records.scan(tmp_path)
    assert [r["run_id"] for r in valid] == [good["run_id"]]
    invalid = {Path(r["path"]).name: r["reason"] for r in bad}
    assert set(invalid) == set(BAD)
    assert "JSON list" in invalid["list.json"] and "not valid JSON" in invalid["truncated.json"]
    assert "no config" in invalid["noconfig.json"] and "kind 'mqarr'" in invalid["kind.json"]
    assert "accuracy" in invalid["types.json"]
    assert all(str(runs / name) in invalid[name] for name in BAD)  # the reason names the file
    assert (runs / "invalid" / "list.json").read_text() == "[1, 2]"  # moved, not deleted
    assert "truncated.json" in caplog.text
    md = report.load(tmp_path).invalid
    assert len(md) == len(BAD)
    report.write_report(tmp_path, tmp_path / "rep", execute=False)
    text = (tmp_path / "rep" / "table.md").read_text()
    assert "## Invalid records" in text and all(name in text for name in BAD)


def test_an_invalid_record_that_cannot_be_moved_is_still_listed(tmp_path, monkeypatch):
    mqar_record(tmp_path, "zoo", "gla", 64, 1e-3, 1, [0.5, 0.5])
    (tmp_path / "zoo" / "runs" / "list.json").write_text("[]")

    def read_only(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(records.os, "replace", read_only)
    valid, bad = records.scan(tmp_path)
    assert len(valid) == 1 and [Path(b["path"]).name for b in bad] == ["list.json"]
    assert (tmp_path / "zoo" / "runs" / "list.json").exists()


def test_a_truncated_record_is_set_aside_and_its_run_done_again(tmp_path):
    rec = T.train(tiny(tmp_path, epochs=1))
    path = records.record_path(tmp_path, rec["run_id"])
    path.write_text(path.read_text()[:100])
    again = T.train(tiny(tmp_path, epochs=1))
    assert again["status"] == "complete" and again["started_at"] >= rec["started_at"]
    assert records.read_record(path) == again
    assert (path.parent / "invalid" / path.name).exists()


# ----------------------------------------------------------------------------------------- claims
def test_a_claimed_run_is_not_trained_again(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, epochs=1)
    config, _ = T.load_config(cfg)
    path = records.record_path(tmp_path, records.run_id(config))
    path.parent.mkdir(parents=True)
    held = claims.claim(path)
    assert held is not None and claims.claim(path) is None
    monkeypatch.setattr(T, "_run", lambda *a: pytest.fail("trained a claimed run"))
    rec = T.train(cfg)
    assert rec["status"] == "running" and f"pid {os.getpid()}" in rec["reason"] and not path.exists()
    held.release()
    assert not path.with_suffix(".lock").exists() and claims.claim(path) is not None


def test_ctrl_c_while_claiming_leaves_no_lock(tmp_path, monkeypatch):
    # the lock exists from os.open on; an interrupt before the Claim holds it must not leave it behind
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(claims.json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        claims.claim(tmp_path / "run.json")
    assert not list(tmp_path.iterdir())


def test_stale_claims_are_taken_over(tmp_path):
    record = tmp_path / "run.json"
    lock = record.with_suffix(".lock")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "token": "a"}))
    assert claims.claim(record) is not None  # its process is gone
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "b"}))
    assert claims.claim(record) is None  # another host's live heartbeat
    old = time.time() - claims.STALE_S - 1
    os.utime(lock, (old, old))
    c = claims.claim(record)
    assert c is not None and json.loads(lock.read_text())["pid"] == os.getpid()
    c.release()


def test_a_claim_ends_its_worker_when_the_sweep_process_dies(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    worker = f"""
import time
from pathlib import Path
from mom_bench import claims
claims.HEARTBEAT_S = 0.05
c = claims.claim(Path({str(tmp_path / "run.json")!r}))
print("claimed", flush=True)
time.sleep(30)
"""
    env = {**os.environ, claims.PARENT_ENV: f"{socket.gethostname()}:{parent.pid}"}
    proc = subprocess.Popen([sys.executable, "-c", worker], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "claimed\n"
    time.sleep(0.3)
    assert proc.poll() is None  # the parent lives: so does the worker
    parent.kill()
    parent.wait()
    assert proc.wait(timeout=10) == claims.EXIT_ORPHANED
    assert not (tmp_path / "run.lock").exists()


def test_worker_slots_are_distinct_and_a_dead_workers_slot_is_reused(tmp_path):
    """The slots that give a sweep's workers one GPU each (`runtime.device` on a host of several)."""
    ask = (f"import time; from mom_bench import claims; print(claims.worker_slot({str(tmp_path)!r}), "
           f"flush=True); time.sleep(float(input()))")
    procs = [subprocess.Popen([sys.executable, "-c", ask], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    slots = [int(p.stdout.readline()) for p in procs]
    assert sorted(slots) == [0, 1, 2]
    assert claims.worker_slot(str(tmp_path)) == 3 == claims.worker_slot(str(tmp_path))  # kept for life
    first = procs[slots.index(1)]
    first.communicate("0")  # slot 1's holder ends
    late = subprocess.run([sys.executable, "-c", ask], input="0", capture_output=True, text=True)
    assert int(late.stdout) == 1
    for p in procs:
        if p is not first:
            p.communicate("0")


def test_two_sweeps_on_one_folder_train_each_point_once(tmp_path):
    args = ["sweep", "model=gated_deltanet,linear_attention,gla", f"results_dir={tmp_path}", "launcher=local",
            *TINY]
    procs = [subprocess.Popen([sys.executable, "-m", "mom_bench", *args], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    logs = "".join(out + err for p in procs for out, err in [p.communicate(timeout=300)])
    finished = [line for line in logs.splitlines() if ": mean accuracy" in line]
    ids = [line.split(" - ")[1].split(":")[0] for line in finished]
    assert sorted(ids) == sorted({p.stem for p in tmp_path.glob("runs/*.json")}) and len(ids) == 3
    assert len(list((tmp_path / "hydra").iterdir())) == 2  # a log folder each
    # every record whole and complete, no claim or temporary file left behind
    valid, invalid = records.scan(tmp_path)
    assert not invalid and sorted(r["run_id"] for r in valid) == sorted(ids)
    assert all(r["status"] == "complete" for r in valid)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(f"{i}.json" for i in ids)


@pytest.mark.slow
def test_workers_end_with_a_killed_sweep(tmp_path):
    # A parallel sweep whose runs take minutes; kill -9 its main process once a run has claimed its point.
    args = ["sweep", "model=gated_deltanet,linear_attention", f"results_dir={tmp_path}", "launcher=parallel",
            *TINY, "data.train.0.num_examples=200000", "optim.epochs=50"]
    sweep = subprocess.Popen([sys.executable, "-m", "mom_bench", *args], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob("runs/*.lock")) and time.time() < deadline:
        time.sleep(0.5)
    locks = list(tmp_path.glob("runs/*.lock"))
    assert locks, "no run started"
    workers = {json.loads(p.read_text())["pid"] for p in locks}
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    deadline = time.time() + 3 * claims.HEARTBEAT_S + 30
    while any(claims._alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(claims._alive(pid) for pid in workers)
    assert not list(tmp_path.glob("runs/*.json"))  # interrupted, not recorded as done


# ------------------------------------------------------------------------------ results not lost
def test_run_ids_are_bounded():
    pattern = ["mom", "attention"] * 100
    rid = records.run_id({"model": {"mixer": "mom", "d_model": 64, "pattern": pattern},
                          "data": {"train": [{"seq_len": 64, "num_kv_pairs": 4}] * 20}, "optim": {"lr": 1e9},
                          "seed": 1})
    assert len(rid) <= records.MAX_SLUG + 9 and rid.startswith("mom-attention-")


def test_an_unwritable_results_folder_is_found_before_training(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    cfg = dataclasses.replace(tiny(tmp_path), results_dir=str(tmp_path / "file" / "results"))
    monkeypatch.setattr(T, "_run", lambda *a: pytest.fail("trained although its record cannot be written"))
    with pytest.raises(records.RecordError, match="cannot write run records"):
        T.train(cfg)


def test_a_record_that_cannot_be_written_goes_to_the_fallback(tmp_path, monkeypatch, caplog):
    real = records.write_record

    def lost_mount(path, rec):
        if Path(path).parent == tmp_path / "runs":
            raise OSError(5, "Input/output error")
        real(path, rec)

    monkeypatch.setattr(records, "write_record", lost_mount)
    monkeypatch.setattr(records.tempfile, "tempdir", str(tmp_path / "tmp"))
    rec = T.train(tiny(tmp_path, epochs=1))
    fallback = Path(rec["record_path"])
    assert fallback == tmp_path / "tmp" / "mom_bench-records" / f"{rec['run_id']}.json"
    assert json.loads(fallback.read_text())["status"] == "complete" and str(fallback) in caplog.text


# ------------------------------------------------------------------------------------ sweeps
def test_a_sweep_with_bad_points_refuses_naming_each(tmp_path):
    out = cli("sweep", *TINY, f"results_dir={tmp_path}", "model=attention,gla", "model.d_model=-8,16",
              "launcher=local", cwd=tmp_path)
    assert out.returncode == 1 and "2 of 4 sweep points are invalid, nothing was run" in out.stderr
    assert "model=attention model.d_model=-8: model.d_model: must be positive" in out.stderr
    assert "model=gla model.d_model=-8" in out.stderr and not list(tmp_path.glob("runs/*.json"))


# ------------------------------------------------------------------------------------ permissions
@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_files_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        records.write_record(tmp_path / "runs" / "a.json", {"run_id": "a"})
        folder = files.temp_dir(tmp_path, "x")
    finally:
        os.umask(old)
    assert (tmp_path / "runs" / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask


# ------------------------------------------------------------------------------------ small things
def test_large_learning_rates_keep_their_exponent_sign():
    base = {"model": {"mixer": "gla", "d_model": 64}, "data": {"train": [{"seq_len": 64, "num_kv_pairs": 4}]},
            "seed": 1}
    assert "_lr1e09_" in records.run_id({**base, "optim": {"lr": 1e9}})
    assert "_lr1e-09_" in records.run_id({**base, "optim": {"lr": 1e-9}})


def test_the_log_says_how_many_epochs_ran(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(T, "evaluate", lambda model, slices, bs, device, **kw: {s.name: 1.0 for s in slices})
    caplog.set_level("INFO")
    T.train(tiny(tmp_path, epochs=8))
    assert "best epoch 1; 1 of 8 epochs run" in caplog.text


def test_a_sweep_says_run_k_of_n(tmp_path):
    out = cli("sweep", *TINY, f"results_dir={tmp_path}", "model=gla,linear_attention", "launcher=local",
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "run 1 of 2: model=gla" in out.stdout + out.stderr
    assert "run 2 of 2: model=linear_attention" in out.stdout + out.stderr


def test_ctrl_c_ends_quietly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "mom_bench", "train", *TINY, f"results_dir={tmp_path}",
                             "data.train.0.num_examples=100000"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list(tmp_path.glob("runs/*.lock")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not list(tmp_path.glob("runs/*"))  # no record, and the claim released


def test_checkpoints_follow_the_umask(tmp_path):
    from mom_bench import checkpoint as C
    from test_checkpoint import VOCAB, trained

    cfg, model, opt, _ = trained("gla")
    old = os.umask(0o022)
    try:
        path = C.save_checkpoint(tmp_path / "ck", model, cfg, vocab_size=VOCAB, optimizer=opt, train_state={})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()} == {
        name: 0o644 for name in ("config.json", "model.safetensors", "optimizer.safetensors", "train_state.json")}


def test_pretrain_and_eval_refuse_unknown_keys(tmp_path):
    from mom_bench.evaluate import evaluate
    from mom_bench.pretrain import pretrain

    with pytest.raises(ConfigError, match=r"optim\.lrr \(did you mean optim\.lr\?\)"):
        pretrain({"optim": {"lrr": 1e-3}, "out_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"checkpont \(did you mean checkpoint\?\)"):
        evaluate({"checkpont": str(tmp_path), "results_dir": str(tmp_path)})
    out = cli("pretrain", f"out_dir={tmp_path}", f"data.files={tmp_path}/*.txt", "+data.seqlen=8", cwd=tmp_path)
    assert out.returncode == 1 and "data.seqlen (did you mean data.seq_len?)" in out.stderr


def test_a_sweep_whose_summary_fails_exits_non_zero(tmp_path, monkeypatch):
    import mom_bench.summary
    from mom_bench.sweep import SweepCallback

    rec = mqar_record(tmp_path, "zoo", "gla", 64, 1e-3, 1, [0.5, 0.5])
    folder = tmp_path / "zoo"
    callback = SweepCallback()
    callback.planned = [{"name": "model=gla", "results_dir": str(folder), "run_id": rec["run_id"],
                         "path": records.record_path(folder, rec["run_id"])}]

    def disk_full(results_dir):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mom_bench.summary, "summarize", disk_full)
    with pytest.raises(SystemExit, match="(?s)1 of 1 points complete.*the summary of .*No space left"):
        callback.on_multirun_end(config=None)


def test_one_device_choice_for_every_command():
    import torch

    from mom_bench import runtime
    from mom_bench.pretrain import Dist

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    assert runtime.device("auto") == runtime.device(None) == runtime.device("cpu") == torch.device("cpu")
    for choice in ("cuda", "cuda:1"):
        with pytest.raises(RuntimeError, match=f"device={choice} but CUDA is not available"):
            runtime.device(choice)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        Dist("cuda")
    from mom_bench.lm_eval_model import MomBenchLM

    with pytest.raises(RuntimeError, match="CUDA is not available"):  # no silent run on the CPU
        MomBenchLM(device="cuda")
