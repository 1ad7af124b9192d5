"""`python -m mom_bench bench --suite sweep`: the sweep command itself, timed on a fixed cut of the Zoology
figure 2 grid (`conf/sweep/zoology_fig2_cut.yaml`: every mixer, d_model 64 and 256, L 64 and 512, one
learning rate, two whole epochs), once per launcher setting (1 process, or n joblib workers on the one
GPU; under the CUDA MPS daemon when it runs).

Per setting: runs completed per hour of wall time, and the hours the whole figure 2 grid (448 runs of up
to 64 epochs) would take at that pace. The projection takes each run of the cut as it was measured (its
set-up, its first epoch with compilation and graph capture, then 63 more epochs at its second epoch's
training and evaluation time), scales the cut's 28 runs to the grid's 448, divides by the concurrency the
setting reached (summed run time over the span in which runs ran) and adds the sweep's own start and end
once. It ignores early stopping (an upper bound) and stands for the grid's d_model 128 and 512 and
L 128 and 256 with the cut's mean. Evaluation is reported as a share of each run's second epoch of
training.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

from mom_bench import records

CUT = "zoology_fig2_cut"
GRID_RUNS, GRID_EPOCHS = 448, 64  # Zoology figure 2: 7 mixers x 4 widths x 4 learning rates x 4 lengths
MPS_PIPE = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")


def mps_running() -> bool:
    """Whether a CUDA MPS control daemon is listening (its pipe directory holds `control`)."""
    return os.path.exists(os.path.join(MPS_PIPE, "control"))


def launcher(jobs: int) -> List[str]:
    return ["launcher=local"] if jobs == 1 else ["launcher=parallel", f"hydra.launcher.n_jobs={jobs}"]


def run_setting(out: Path, jobs: int, extra: Sequence[str] = (), log=print, limit_s: float = 0) -> Dict:
    """Run the cut through `python -m mom_bench sweep` in a fresh folder and summarize its records; after
    `limit_s` seconds (0: none) the sweep is stopped and what completed is summarized."""
    mps = mps_running()
    folder = out / f"sweep-{jobs}jobs{'-mps' * mps}-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [sys.executable, "-m", "mom_bench", "sweep", f"sweep={CUT}", f"results_dir={folder}",
           *launcher(jobs), "progress=false", *extra]
    log(f"sweep, {jobs} job{'s' * (jobs > 1)}{', MPS' * mps}: {' '.join(cmd[1:])}")
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    with open(folder / "sweep.log", "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=limit_s or None).returncode
        except subprocess.TimeoutExpired:  # the sweep is killed; its workers end with it (mom_bench.claims)
            rc = f"stopped after {limit_s:.0f} s"
    wall = time.perf_counter() - t0
    row = summarize(records.scan(folder)[0], wall)
    row.update(jobs=jobs, mps=mps, exit_status=rc, folder=str(folder), command=" ".join(cmd[1:]))
    log(f"  {row['complete']} runs in {wall:.0f} s: {row['runs_per_hour']:.0f} runs/h, "
        f"grid projected at {row['grid_hours']:.2f} h")
    return row


def summarize(recs: List[Dict], wall: float) -> Dict:
    done = [r for r in recs if r.get("kind") == "mqar" and r.get("status") == "complete"]
    serial = grid = 0.0
    shares = []
    for r in done:
        epochs = r["eval_history"]
        first, last = epochs[0], epochs[-1]
        steady = last["train_time_s"] + last["eval_time_s"]
        setup = r["wall_time_s"] - r["train_time_s"] - r["eval_time_s"]
        serial += r["wall_time_s"]
        grid += setup + first["train_time_s"] + first["eval_time_s"] + (GRID_EPOCHS - 1) * steady
        shares.append(last["eval_time_s"] / max(last["train_time_s"], 1e-9))
    # Concurrency over the span in which runs ran; the sweep's own start and end (imports, checking every
    # point, the table and report) happen once per sweep, whatever its size.
    times = [datetime.datetime.fromisoformat(r[k]).timestamp() for r in done for k in ("started_at", "ended_at")]
    span = max(times) - min(times) if times else 0.0
    concurrency = serial / span if span else 1.0
    n = max(len(done), 1)
    return dict(complete=len(done), wall_s=wall, runs_per_hour=len(done) / wall * 3600 if wall else 0.0,
                concurrency=concurrency,
                grid_hours=(max(wall - span, 0.0) + grid * GRID_RUNS / n / concurrency) / 3600,
                eval_share_max=max(shares, default=0.0), eval_share_mean=sum(shares) / n)


def per_run_table(folder: Path) -> str:
    """The cut's runs of one setting: time per epoch and the evaluation's share."""
    lines = ["| run | wall s | epoch 1 train s | epoch 2 train s | epoch 2 eval s | eval / train |",
             "|---|---|---|---|---|---|"]
    for r in records.scan(folder)[0]:
        if r.get("status") != "complete":
            continue
        e1, e2 = r["eval_history"][0], r["eval_history"][-1]
        lines.append(f"| {r['run_id']} | {r['wall_time_s']:.1f} | {e1['train_time_s']:.2f} | "
                     f"{e2['train_time_s']:.2f} | {e2['eval_time_s']:.2f} | "
                     f"{e2['eval_time_s'] / max(e2['train_time_s'], 1e-9):.1%} |")
    return "\n".join(lines)


def markdown(rows: List[Dict]) -> str:
    lines = ["## sweep: the Zoology figure 2 cut (`conf/sweep/zoology_fig2_cut.yaml`) through "
             "`python -m mom_bench sweep`", "",
             "| jobs | MPS | runs complete | wall s | runs per hour | concurrency | grid projected, GPU-hours "
             "| evaluation / training (mean, max) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['jobs']} | {'yes' if r['mps'] else 'no'} | {r['complete']} | {r['wall_s']:.0f} | "
                     f"{r['runs_per_hour']:.0f} | {r['concurrency']:.2f} | {r['grid_hours']:.2f} | "
                     f"{r['eval_share_mean']:.1%}, {r['eval_share_max']:.1%} |")
    for r in rows:
        lines += ["", f"### {r['jobs']} jobs{', MPS' * r['mps']} (exit status {r['exit_status']}): "
                      f"`{r['command']}`", "",
                  per_run_table(Path(r["folder"]))]
    return "\n".join(lines)
