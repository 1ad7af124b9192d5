"""Reports from hand-made run records: the tables' numbers, every figure written, the notebook executed."""
import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mom_bench import records, report

SLICES = [(64, 4), (256, 16)]


def mqar_record(root, sweep, mixer, d_model, lr, seed, acc=None, reason=None, state=None, **model):
    """A record as mom_bench.train writes it; `acc=None` makes a failed run (without "model" when `state`
    is None too: a run that failed before its model was built)."""
    m = {"mixer": mixer, "d_model": d_model, "n_layers": 2, "num_heads": 1, "pattern": None,
         "num_memories": 4, "topk": 2, **model}
    data = {"train": [{"seq_len": 64, "num_kv_pairs": 4, "num_examples": 100}],
            "test": [{"seq_len": L, "num_kv_pairs": n, "num_examples": 10} for L, n in SLICES]}
    config = {"model": m, "data": data, "optim": {"lr": lr}, "seed": seed, "sweep_name": sweep}
    rid = records.run_id(config)
    rec = {"run_id": rid, "status": "failed" if acc is None else "complete", "reason": reason,
           "config": config, "hardware": {"device": "cpu", "device_name": "Test CPU"}}
    total, active = state or (2 * d_model * 256, 2 * d_model * 256)
    if acc is not None or state is not None:
        rec["model"] = {"label": mixer, "params": 1000 * d_model,
                        "state_size": {"total": total, "active": active,
                                       "total_bytes": 4 * total, "active_bytes": 4 * active}}
    if acc is not None:
        rec.update(accuracy={records.slice_name({"seq_len": L, "num_kv_pairs": n}): a
                             for (L, n), a in zip(SLICES, acc)},
                   mean_accuracy=sum(acc) / len(acc), throughput_tokens_per_s=1e4, best_epoch=1)
    records.write_record(records.record_path(root / sweep, rid), rec)
    return rec


@pytest.fixture
def root(tmp_path):
    """Two sweeps in two folders; seeds, failed runs, a group with no complete run, MoM's two states."""
    r = tmp_path / "results"
    # attention d64: lr 1e-3 averages 0.75 over two seeds, lr 3e-3 averages 0.675 though it has the single
    # best run (0.95): the seed-averaged choice is 1e-3.
    mqar_record(r, "zoo", "attention", 64, 1e-3, 1, [0.9, 0.7])
    mqar_record(r, "zoo", "attention", 64, 1e-3, 2, [0.8, 0.6])
    mqar_record(r, "zoo", "attention", 64, 3e-3, 1, [1.0, 0.9])
    mqar_record(r, "zoo", "attention", 64, 3e-3, 2, [0.6, 0.2])
    mqar_record(r, "zoo", "attention", 128, 1e-3, 1, [1.0, 0.8])
    mqar_record(r, "zoo", "attention", 128, 3e-3, 1, reason="loss became nan at step 3", state=(1, 1))
    mqar_record(r, "zoo", "mom", 64, 1e-3, 1, [0.5, 0.3], state=(4096, 2048))
    mqar_record(r, "zoo", "mom", 64, 3e-3, 1, [0.4, 0.2], state=(4096, 2048))
    mqar_record(r, "zoo", "mom", 128, 1e-3, 1, reason="CUDA out of memory.\nTried to allocate", state=(8192, 4096))
    mqar_record(r, "zoo", "mom", 128, 3e-3, 1, reason="RuntimeError: boom")  # no "model": failed early
    mqar_record(r, "other", "gla", 64, 1e-2, 123, [0.25, 0.75])
    return r


def add_bench_and_eval(r):
    bench = {"kind": "bench", "run_id": "bench1", "status": "complete", "reason": None,
             "hardware": {"device_name": "NVIDIA H200"},
             "timings": [{"name": "mom (triton)", "seq_len": L, "batch_size": 8, "pass": "fwd+bwd", "ms": L / 512}
                         for L in (512, 1024, 2048)]
                        + [{"name": "attention", "seq_len": L, "pass": "fwd", "tokens_per_s": 1e6 / L}
                           for L in (512, 1024, 2048)]}
    scores = {"kind": "eval", "run_id": "eval1", "status": "complete", "model": {"label": "mom", "d_model": 128},
              "scores": {"fda": 0.4, "swde": 0.3, "squad": 0.2}}
    broken = {"kind": "eval", "run_id": "eval2", "status": "failed", "reason": "no checkpoint", "scores": {}}
    for rec in (bench, scores, broken):
        records.write_record(r / "extra" / "runs" / f"{rec['run_id']}.json", rec)


def rows(path):
    return list(csv.DictReader(path.open()))


def pick(table, **key):
    found = [row for row in table if all(str(row[k]) == str(v) for k, v in key.items())]
    assert len(found) == 1, (key, found)
    return found[0]


def test_tables_pick_the_best_lr_over_seeds_and_keep_failures(root):
    out = root / "rep"
    report.write_report(root, out, execute=False)

    runs = rows(out / "runs.csv")
    assert len(runs) == 11 and sum(r["status"] == "failed" for r in runs) == 3
    assert pick(runs, model="mom", d_model=64, lr=0.001)["state_active_bytes"] == "8192"

    best = rows(out / "table.csv")
    assert len(best) == 5  # zoo: attention 64/128, mom 64/128; other: gla 64
    a = pick(best, sweep="zoo", model="attention", d_model=64)
    assert float(a["lr"]) == 1e-3 and a["n_seeds"] == "2" and a["status"] == "complete"
    assert float(a["L64_n4"]) == pytest.approx(0.85) and float(a["L256_n16"]) == pytest.approx(0.65)
    assert float(a["mean"]) == pytest.approx(0.75)
    assert float(a["L64_n4_std"]) == pytest.approx(math.sqrt(0.005))  # sample std of 0.9 and 0.8
    assert float(a["mean_std"]) == pytest.approx(math.sqrt(0.005))
    assert (a["runs"], a["failed"]) == ("4", "0")

    a128 = pick(best, sweep="zoo", model="attention", d_model=128)
    assert float(a128["lr"]) == 1e-3 and a128["n_seeds"] == "1" and a128["mean_std"] == ""
    assert float(a128["mean"]) == pytest.approx(0.9) and (a128["runs"], a128["failed"]) == ("2", "1")

    m64 = pick(best, sweep="zoo", model="mom", d_model=64)
    assert float(m64["lr"]) == 1e-3 and float(m64["mean"]) == pytest.approx(0.4)
    assert (m64["state_total_bytes"], m64["state_active_bytes"], m64["memories"], m64["topk"]) == \
        ("16384", "8192", "4", "2")
    m128 = pick(best, sweep="zoo", model="mom", d_model=128)  # every run failed: kept, marked failed
    assert m128["status"] == "failed" and m128["n_seeds"] == "0" and m128["mean"] == ""
    assert (m128["runs"], m128["failed"]) == ("2", "2") and "CUDA out of memory" in m128["reason"]
    g = pick(best, sweep="other", model="gla")
    assert g["memories"] == "" and float(g["mean"]) == pytest.approx(0.5)

    md = (out / "table.md").read_text()
    assert "11 runs, 3 failed" in md and "## zoo" in md and "## other" in md
    assert "0.850 ± 0.071" in md and "| failed " in md
    failed = md.split("## Failed runs")[1]
    assert failed.count("\n- `") == 3 and "CUDA out of memory. Tried to allocate" in failed  # one line each
    tex = (out / "table.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 2 and r"0.850 $\pm$ 0.071" in tex and r"L64\_n4" in tex


def test_every_figure_is_written_and_shows_failures_and_both_mom_states(root):
    add_bench_and_eval(root)
    out = root / "rep"
    paths = report.write_report(root, out, execute=False)
    stems = ["accuracy_vs_d_model_zoo", "accuracy_vs_state_zoo", "accuracy_vs_d_model_other",
             "accuracy_vs_state_other", "throughput_vs_seq_len", "task_scores"]
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == sorted(f"{s}.{ext}" for s in stems for ext in ("png", "svg"))
    for name in figures:
        data = (out / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" if name.endswith("png") else b"<svg" in data[:1000]
        assert len(data) > 5000
    assert {p.name for p in paths} >= {"table.csv", "table.md", "table.tex", "runs.csv", "bench.csv",
                                       "scores.csv", "report.ipynb"}

    res = report.load(root)
    assert list(res.failed["run_id"]).count("eval2") == 1  # failed records of any kind are listed
    assert "## Benchmarks" in (out / "table.md").read_text()
    bench = res.bench[res.bench["name"] == "mom (triton)"]
    assert list(bench["tokens_per_s"]) == pytest.approx([8 * 512 * 1e3] * 3)  # from ms and batch size

    # accuracy against d_model: mom's failed d_model 128 is an x at 0 in every panel
    fig = report.plot_accuracy_vs_d_model(res.best, sweep="zoo")
    for ax in fig.axes:
        xs = [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()
              if line.get_marker() == "x" and len(line.get_xdata())]
        assert xs == [([128], [0.0])]
        assert "no complete run" in ax.get_legend_handles_labels()[1]

    # accuracy against state: MoM at its total (solid) and active (dashed) state; attention once
    fig = report.plot_accuracy_vs_state(res.best, sweep="zoo")
    lines = {c.get_label(): c.lines[0] for c in fig.axes[0].containers}
    assert set(lines) == {"attention", "mom (total state)", "mom (active state)"}
    assert list(lines["mom (total state)"].get_xdata()) == [16384]
    assert list(lines["mom (active state)"].get_xdata()) == [8192]
    assert lines["mom (total state)"].get_linestyle() == "-"
    assert lines["mom (active state)"].get_linestyle() == "--"
    assert fig.axes[0].get_xscale() == "log"


def test_optional_figures_only_when_their_records_exist(root):
    out = root / "rep"
    report.write_report(root, out, execute=False)
    names = {p.stem for p in (out / "figures").iterdir()}
    assert names == {"accuracy_vs_d_model_zoo", "accuracy_vs_state_zoo", "accuracy_vs_d_model_other",
                     "accuracy_vs_state_other"}
    assert not (out / "bench.csv").exists() and "## Benchmarks" not in (out / "table.md").read_text()


def test_models_differing_in_a_setting_are_not_merged(tmp_path):
    mqar_record(tmp_path, "s", "attention", 64, 1e-3, 1, [1.0, 1.0], num_heads=1)
    mqar_record(tmp_path, "s", "attention", 64, 1e-3, 1, [0.2, 0.2], num_heads=2)
    mqar_record(tmp_path, "s", "mom", 64, 1e-3, 1, [0.5, 0.5])
    best = report.load(tmp_path).best
    assert sorted(best["model"]) == ["attention (num_heads=1)", "attention (num_heads=2)", "mom"]
    assert list(best.sort_values("model")["mean"]) == pytest.approx([1.0, 0.2, 0.5])


def test_notebook_executes_and_exports_html(root):
    pytest.importorskip("nbclient")
    pytest.importorskip("nbconvert")
    add_bench_and_eval(root)
    out = root / "rep"
    report.write_report(root, out)
    nb = json.loads((out / "report.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["execution_count"] for c in code)
    outputs = [o for c in code for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(report.figure_specs(report.load(root)))  # every figure drawn inline
    assert any("report.plot_accuracy_vs_state(res.best, sweep='zoo')" in "".join(c["source"]) for c in code)
    html = (out / "report.html").read_text()
    assert "<html" in html and html.count("data:image/png;base64") >= len(images)
    assert "loss became nan at step 3" in html  # the failed runs' table


def test_summary_writes_the_report_and_the_summary_copies(root):
    from mom_bench.summary import summarize

    results = root / "zoo"
    summarize(results)
    rep = results / "report"
    assert {"table.csv", "table.md", "table.tex", "runs.csv", "report.ipynb"} <= {p.name for p in rep.iterdir()}
    if importlib.util.find_spec("nbclient"):  # executed, not only written
        cells = json.loads((rep / "report.ipynb").read_text())["cells"]
        assert all(c["execution_count"] for c in cells if c["cell_type"] == "code")
        assert (rep / "report.html").exists()
    assert (results / "table.md").read_text() == (rep / "table.md").read_text()
    assert (results / "accuracy.png").read_bytes() == (rep / "figures" / "accuracy_vs_d_model_zoo.png").read_bytes()
    best = rows(results / "table.csv")
    assert len(best) == 4 and float(pick(best, model="attention", d_model=64)["lr"]) == 1e-3


def test_a_failing_notebook_keeps_the_tables_and_says_so(root, monkeypatch):
    from mom_bench.summary import summarize

    real = report.write_notebook

    def broken(res, out, execute=True):
        if execute:
            raise RuntimeError("kernel died")
        return real(res, out, execute=False)

    monkeypatch.setattr(report, "write_notebook", broken)
    with pytest.raises(report.ReportError, match="kernel died"):
        summarize(root / "zoo")
    assert (root / "zoo" / "table.md").exists() and (root / "zoo" / "report" / "report.ipynb").exists()
    assert report.main([str(root), "--out", str(root / "rep")]) == 1  # `report` fails too


def test_empty_root_is_refused(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    assert report.main([str(tmp_path)]) == 1
    assert f"no run records under {tmp_path}" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing")]) == 1
    assert not (tmp_path / "report").exists()


def test_cli(root):
    out = subprocess.run([sys.executable, "-m", "mom_bench", "report", str(root), "--no-execute"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (root / "report" / "table.tex").exists() and str(root / "report" / "table.md") in out.stdout
    empty = subprocess.run([sys.executable, "-m", "mom_bench", "report", str(root / "nothing")],
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode == 1 and "error: no run records under" in empty.stderr
    assert "Traceback" not in empty.stderr


def test_figure_captions_are_whole_sentences(root):
    add_bench_and_eval(root)
    res = report.load(root)
    cells = report.notebook(res, root / "report")["cells"]
    for spec in report.figure_specs(res):
        [text] = [c["source"] for c in cells if c["source"].startswith(f"## {spec.stem}\n")]
        caption = text.split("\n\n", 1)[1]
        doc = spec.function.__doc__
        assert caption.endswith(".") and caption == " ".join(doc.split("\n\n")[0].split())


def test_task_score_labels_do_not_overlap():
    import pandas as pd
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    tasks = ["jrt_fda", "jrt_fda_twice", "jrt_swde", "jrt_swde_twice", "jrt_squad", "jrt_squad_twice"]
    scores = pd.DataFrame([{"run_id": m, "model": m, "d_model": 64, "task": t, "score": 0.5}
                           for m in ("mom", "gated_deltanet") for t in tasks])
    fig = report.plot_task_scores(scores)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    ax = fig.axes[0]
    labels = [t for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text() in tasks]
    assert sorted(t.get_text() for t in labels) == sorted(tasks)
    boxes = [t.get_window_extent(canvas.get_renderer()) for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_readme_shows_the_default_sweep_as_its_records_give_it():
    # The table in README.md is results/default_sweep/table.md, which the committed records regenerate.
    repo = Path(__file__).resolve().parent.parent
    folder = repo / "results" / "default_sweep"

    def table(text):
        return [line for line in text.splitlines() if line.startswith("|")]

    readme = (repo / "README.md").read_text()
    shown = table(readme.split("**The default sweep**", 1)[1].split("![default sweep]", 1)[0])
    assert shown == table((folder / "table.md").read_text())
    assert shown == table(report.markdown(report.load(folder)))
