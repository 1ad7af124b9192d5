"""The benchmark's bookkeeping (ratios, memory ratios, failures, the table) and its command line.

The timings themselves need a GPU (`python -m mom_bench bench`); here the clock is replaced by a fake one
so that the arithmetic on the measured numbers is checked exactly.
"""
import pytest

from mom_bench import bench


def fake_case():
    def contender(name, ms):
        def build():
            if ms is None:
                raise RuntimeError("CUDA out of memory\nmore lines")
            return {"fwd": lambda: ms, "fwd+bwd": lambda: 3 * ms}
        return bench.Contender(name, build)

    return bench.Case("layer", "toy", 2, 8, [contender("ours", 1.0), contender("theirs", 4.0),
                                             contender("broken", None)], reference="theirs", memory=True)


def test_ratios_divide_by_the_reference_and_failures_are_kept(monkeypatch):
    monkeypatch.setattr(bench, "time_ms", lambda fn, rep: fn())
    monkeypatch.setattr(bench, "peak_mb", lambda fn: 10 * fn())
    monkeypatch.setattr(bench.torch.cuda, "empty_cache", lambda: None)
    case, log = fake_case(), []
    bench.run_case(case, rep=1, log=log.append)
    rows = {(r["name"], r["pass"]): r for r in case.rows}
    assert rows["ours", "fwd"]["ratio"] == pytest.approx(0.25)
    assert rows["ours", "fwd+bwd"]["ratio"] == pytest.approx(0.25)
    assert rows["theirs", "fwd"]["ratio"] == pytest.approx(1.0)
    assert rows["ours", "fwd+bwd"]["memory_ratio"] == pytest.approx(0.25)  # 30 MB against 120 MB
    assert "peak_mb" not in rows["ours", "fwd"]  # memory is measured for fwd+bwd only
    assert rows["ours", "fwd"]["tokens_per_s"] == pytest.approx(2 * 8 / 1e-3)
    assert rows["broken", "-"]["error"] == "RuntimeError: CUDA out of memory"
    assert len(log) == 3
    text = bench.markdown([case], dict(device_name="GPU", torch="x"), "python -m mom_bench bench")
    assert "| ours | fwd+bwd | 3.000 | 0.25 | 30 | 0.25 |" in text
    assert "| broken | - | failed: RuntimeError: CUDA out of memory |" in text


def test_every_suite_builds_its_cases_without_running_them(monkeypatch):
    cases = bench.build_cases(bench.SUITES, dtype=None, quick=True)
    assert [c.suite for c in cases] == ["kernel", "kernel", "layer", "layer", "decode", "generate",
                                        "train", "train", "train", "train"]
    assert [c.name.split(", n")[0] for c in cases[-2:]] == ["MQAR train step, d_model 512, 2 heads",
                                                           "MQAR train step, d_model 512, 1 head"]
    names = [x.name for x in cases[-1].contenders]
    assert "ours mom (CUDA graph)" in names and "ours attention" in names and "fla MomAttention" in names
    for c in cases:
        assert c.reference in [x.name for x in c.contenders], c.name
    full = bench.build_cases(["layer", "decode"], dtype=None, quick=False)
    assert [c.seq_len for c in full if c.suite == "layer"] == [2048, 16384, 512]
    assert [x.name for x in full[-1].contenders][1:] == ["SDPA KV cache 1K", "SDPA KV cache 8K",
                                                         "SDPA KV cache 32K"]


def test_command_line_errors(capsys):
    from mom_bench.__main__ import main

    with pytest.raises(SystemExit):
        main(["bench", "--suite", "kernel,nope"])
    assert "unknown suite(s) nope" in capsys.readouterr().err
    if not bench.torch.cuda.is_available():
        assert main(["bench", "--suite", "kernel"]) == 1
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_a_contender_over_its_time_limit_is_given_up(monkeypatch):
    import time

    monkeypatch.setattr(bench, "time_ms", lambda fn, rep: fn())
    monkeypatch.setattr(bench.torch.cuda, "empty_cache", lambda: None)
    slow = bench.Contender("slow", lambda: {"fwd": lambda: 1.0, "fwd+bwd": lambda: time.sleep(5) or 2.0})
    fast = bench.Contender("fast", lambda: {"fwd": lambda: 2.0, "fwd+bwd": lambda: 4.0})
    case = bench.Case("kernel", "toy", 1, 4, [slow, fast], reference="slow")
    started = time.time()
    bench.run_case(case, rep=1, log=lambda s: None, limit_s=1)
    assert time.time() - started < 4
    assert [(r["name"], r["pass"]) for r in case.rows] == [("slow", "-"), ("fast", "fwd"), ("fast", "fwd+bwd")]
    assert case.rows[0]["error"].startswith("ContenderTimeout: gave up after 1 s")
    assert all("ratio" not in r for r in case.rows)  # the reference has no complete timing to divide by


def test_main_writes_table_csv_and_a_bench_record_the_report_reads(monkeypatch, tmp_path):
    import json

    from mom_bench import kernels, report

    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench, "hardware", lambda: dict(device_name="Fake GPU", started="0", torch="x"))
    monkeypatch.setattr(bench, "build_cases", lambda suites, dtype, quick: [fake_case()])
    monkeypatch.setattr(bench, "time_ms", lambda fn, rep: fn())
    monkeypatch.setattr(bench, "peak_mb", lambda fn: 10 * fn())
    before = kernels.get_backend()
    try:
        assert bench.main(["--out", str(tmp_path), "--only", "ours,theirs"]) == 0
    finally:
        kernels.set_backend(before)
    assert "| ours | fwd | 1.000 | 0.25 |" in (tmp_path / "bench.md").read_text()
    assert "broken" not in (tmp_path / "bench.csv").read_text()  # left out by --only
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert record["kind"] == "bench" and record["status"] == "complete" and len(record["timings"]) == 4
    frame = report.bench_frame([record])
    assert sorted(frame["name"].unique()) == ["ours", "theirs"]


def test_sweep_suite_runs_the_real_sweep_command_and_projects_the_grid(tmp_path):
    """The sweep suite's cut, shrunk to one tiny run on the CPU: its record's epoch times give the
    projection and the evaluation's share."""
    from mom_bench.bench import throughput
    from test_cli import TINY

    tiny = [o for o in TINY if not o.startswith(("optim.epochs", "progress"))]
    row = throughput.run_setting(tmp_path, 1, [*tiny, "model=gla", "device=cpu"], log=lambda s: None)
    assert row["exit_status"] == 0 and row["complete"] == 1 and not row["mps"]
    (rec,), _ = bench.records.scan(row["folder"])
    first, second = rec["eval_history"]  # the cut's two whole epochs
    run = (rec["wall_time_s"] - second["train_time_s"] - second["eval_time_s"]
           + 63 * (second["train_time_s"] + second["eval_time_s"]))
    assert rec["wall_time_s"] == pytest.approx(rec["train_time_s"] + rec["eval_time_s"], abs=5)
    span = row["wall_s"] - (row["grid_hours"] * 3600 - 448 * run / row["concurrency"])
    assert 0 <= span <= row["wall_s"]
    assert row["eval_share_max"] == pytest.approx(second["eval_time_s"] / second["train_time_s"])
    assert throughput.launcher(4) == ["launcher=parallel", "hydra.launcher.n_jobs=4"]
    assert "| 1 | no | 1 |" in throughput.markdown([row])
