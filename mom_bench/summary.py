"""Sweep summary: the records under a results folder become table.csv, table.md and accuracy.png.

The table keeps, per (model, d_model, train slices), the learning rate with the best mean test accuracy,
as the Zoology and Based papers report. Runs that failed are kept visible: a group whose every run
failed appears with status `failed`, and table.md lists every failed run with its reason.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Dict, List

import pandas as pd
from hydra.experimental.callback import Callback

from mom_bench import records

log = logging.getLogger(__name__)

GROUP = ["model", "d_model", "train"]


def runs_frame(recs: List[Dict[str, Any]]) -> pd.DataFrame:
    """One row per run record; one accuracy column per test slice (named like `L64_n4`)."""
    rows = []
    for r in recs:
        c = r["config"]
        rows.append({
            "model": records.model_label(c["model"]), "d_model": c["model"]["d_model"],
            "train": records.train_label(c["data"]), "lr": c["optim"]["lr"], "status": r["status"],
            **r.get("accuracy", {}), "mean": r.get("mean_accuracy"),
            "state_bytes": r.get("model", {}).get("state_size", {}).get("total_bytes"),
            "best_epoch": r.get("best_epoch"), "wall_time_s": r.get("wall_time_s"),
            "run_id": r["run_id"], "reason": r.get("reason"),
        })
    return pd.DataFrame(rows)


def best_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Best-lr row per group among complete runs; groups with no complete run keep one failed row."""
    done = runs[runs["status"] == "complete"]
    best = done.loc[done.groupby(GROUP)["mean"].idxmax()] if len(done) else done
    failed = runs[runs["status"] != "complete"].drop_duplicates(GROUP)
    failed = failed[~failed.set_index(GROUP).index.isin(best.set_index(GROUP).index)]
    return pd.concat([best, failed]).sort_values(GROUP).reset_index(drop=True)


def slice_columns(runs: pd.DataFrame) -> List[str]:
    fixed = {"model", "d_model", "train", "lr", "status", "mean", "state_bytes", "best_epoch",
             "wall_time_s", "run_id", "reason"}
    return [c for c in runs.columns if c not in fixed]


def plot(best: pd.DataFrame, slices: List[str], path: Path) -> None:
    """Accuracy against d_model, one panel per test slice (sequence length), one line per model."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    n = max(1, len(slices))
    widths = sorted(best["d_model"].unique())
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False, sharey=True)
    for ax, col in zip(axes[0], slices):
        for model, g in best.dropna(subset=[col]).groupby("model"):
            g = g.sort_values("d_model")
            ax.plot(g["d_model"], g[col], marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])  # 64, not 2^6
        ax.minorticks_off()
        ax.set_title(f"test {col}")
        ax.set_xlabel("d_model")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (best lr)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:  # a model may be missing from the first panel
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def summarize(results_dir: str | Path) -> Path:
    """Write table.csv, table.md and accuracy.png into `results_dir`; return the path of table.md."""
    results_dir = Path(results_dir)
    recs = records.load_records(results_dir)
    if not recs:
        raise FileNotFoundError(f"no run records under {results_dir / 'runs'}")
    runs = runs_frame(recs)
    slices = slice_columns(runs)
    best = best_table(runs)
    cols = GROUP + ["lr", "status"] + slices + ["mean", "state_bytes", "best_epoch", "run_id"]
    best[cols].to_csv(results_dir / "table.csv", index=False)

    # Format here, not in tabulate: its one float format would print lr 0.00046 as 0.000.
    shown = best[cols[:-1]].astype(object)
    formats = {"lr": "{:g}", "mean": "{:.3f}", "state_bytes": "{:.0f}", "best_epoch": "{:.0f}",
               **{c: "{:.3f}" for c in slices}}
    for col, fmt in formats.items():
        shown[col] = best[col].map(lambda v: "-" if pd.isna(v) else fmt.format(v))
    failed = runs[runs["status"] != "complete"]
    lines = [f"# MQAR sweep: {results_dir.name}", "",
             f"{len(runs)} runs, {len(failed)} failed. Best learning rate per (model, d_model, train).", "",
             shown.to_markdown(index=False, disable_numparse=True), ""]
    if len(failed):
        # One line each: reasons such as CUDA out-of-memory messages span several lines.
        lines += ["## Failed runs", ""] + [f"- `{r.run_id}`: {' '.join(str(r.reason).split())[:300]}"
                                           for r in failed.itertuples()] + [""]
    md = results_dir / "table.md"
    md.write_text("\n".join(lines))
    plot(best[best["status"] == "complete"], slices, results_dir / "accuracy.png")
    return md


class SummaryCallback(Callback):
    """Hydra callback (see conf/sweep/*.yaml): summarize the sweep's results_dir once all jobs returned."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        from hydra.utils import to_absolute_path

        md = summarize(to_absolute_path(config.results_dir))
        log.info("summary written to %s", md)


def main(argv: List[str]) -> int:
    """`python -m mom_bench table <results_dir>`: re-summarize a finished (or partial) sweep."""
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m mom_bench table <results_dir>", file=sys.stderr)
        return 2
    try:
        md = summarize(argv[0])
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(md.read_text())
    return 0
