"""`python -m mom_bench` as a user runs it: subprocesses, from a directory outside the repository."""
import csv
import subprocess
import sys

from mom_bench.models import MIXERS

# A few seconds per run: 16-token sequences, 48 training examples, one epoch.
TINY = ["data.vocab_size=40", "data.batch_size=16",
        "data.train.0.seq_len=16", "data.train.0.num_kv_pairs=2", "data.train.0.num_examples=48",
        "data.test.0.seq_len=16", "data.test.0.num_kv_pairs=2", "data.test.0.num_examples=32",
        "model.d_model=16", "model.chunk_size=8", "optim.epochs=1", "progress=false"]


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mom_bench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_help_lists_the_subcommands(tmp_path):
    out = cli("--help", cwd=tmp_path)
    assert out.returncode == 0
    assert all(f"  {cmd} " in out.stdout for cmd in ("train", "sweep", "table"))


def test_sweep_writes_table_and_plot(tmp_path):
    # The default sweep file and its parallel launcher, cut down to two mixers; lr=1e30 diverges, so each
    # mixer has one failed run and one complete run.
    results = tmp_path / "results"
    out = cli("sweep", "model=attention,gated_deltanet", "optim.lr=0.003,1e30", f"results_dir={results}",
              *TINY, cwd=tmp_path)
    # Two points failed: the sweep says which and exits 1, after writing the table and report.
    assert out.returncode == 1, out.stderr
    assert "2 of 4 points complete" in out.stderr and out.stderr.count("optim.lr=1e+30: failed: loss became") == 2
    assert len(list((results / "runs").glob("*.json"))) == 4
    rows = list(csv.DictReader((results / "table.csv").open()))
    assert sorted(r["model"] for r in rows) == ["attention", "gated_deltanet"]
    assert all(r["status"] == "complete" and float(r["lr"]) == 0.003 and r["L16_n2"] for r in rows)
    md = (results / "table.md").read_text()
    assert "4 runs, 2 failed" in md and md.count("loss became") == 2
    assert (results / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((results / "hydra").glob("*/multirun.yaml"))  # Hydra's logs beside the records

    # `table` re-summarises the records.
    (results / "table.md").unlink()
    again = cli("table", str(results), cwd=tmp_path)
    assert again.returncode == 0 and "gated_deltanet" in again.stdout and (results / "table.md").exists()


def test_bad_config_exits_with_a_clear_message(tmp_path):
    out = cli("train", "model=foo", cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "model/foo" in out.stderr and all(name in out.stderr for name in MIXERS)

    out = cli("train", "model.mixer=foo", *TINY, f"results_dir={tmp_path}", cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "model.mixer: unknown mixer 'foo'; known: " + ", ".join(sorted(MIXERS)) in out.stderr

    out = cli("train", "model.d_model=abc", cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr and "model.d_model" in out.stderr
    assert not (tmp_path / "runs").exists()
