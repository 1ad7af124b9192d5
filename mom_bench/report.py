"""Reports: every record under a results root becomes tables, figures and an executed notebook.

`python -m mom_bench report <root> [--out DIR]` (default DIR: `<root>/report`) reads every `runs/*.json`
under `root`, at any depth, so one report can cover several sweeps, and writes

    runs.csv                       one row per MQAR training run (every column below)
    table.csv, table.md, table.tex best learning rate per (sweep, model, d_model, train), over seeds
    figures/*.png, figures/*.svg   the figures listed by `figure_specs`
    report.ipynb, report.html      a notebook that rebuilds the tables and draws every figure with this
                                   module, executed headless (nbclient) and exported (nbconvert)

The notebook is executed with nbclient and ipykernel and exported with nbconvert; without them it is written
unexecuted (with a warning) and tables and figures are unaffected. `--no-execute` skips the execution.

Record kinds. Every record lives in a `runs/` folder; its optional `kind` key says what it holds:

- absent or `"mqar"`: an MQAR training run (mom_bench.train; format in mom_bench.records).
- `"bench"`: a timing run. Expected shape (no command writes these yet; the figure is drawn only when one
  exists)::

      {"kind": "bench", "run_id": "...", "status": "complete", "reason": null,
       "hardware": {"device_name": "NVIDIA H200", ...},
       "timings": [{"name": "mom (triton)", "seq_len": 2048, "batch_size": 8, "pass": "fwd+bwd",
                    "ms": 3.2, "tokens_per_s": 5.1e6}, ...]}

  `tokens_per_s` may be left out when `ms` and `batch_size` are given; `pass` defaults to "fwd".
- any record with a `scores` dict (`"kind": "eval"` from `python -m mom_bench eval`): real-task scores::

      {"kind": "eval", "run_id": "...", "status": "complete", "config": {"model": {...}},
       "model": {"label": "mom", "d_model": 128}, "scores": {"fda": 0.41, "swde": 0.33, "squad": 0.20}}

Tables. Per (sweep, model, d_model, train data) the learning rate whose accuracy, averaged over seeds, is
highest is kept, as the Zoology and Based papers report; its accuracies are the mean over seeds with the
sample standard deviation (ddof 1) in `<column>_std` where `n_seeds` > 1. Only complete runs are averaged.
State sizes are those of the records (fp32 bytes; attention's KV cache at the longest test length).
Nothing is dropped silently: `failed` counts the group's failed runs, a group with no complete run is a row
with status `failed`, the figures mark it with an x at accuracy 0, and table.md lists every failed record
with its reason.

Model labels are `records.model_label`; when runs of one label differ in another model setting (MoM with
8 memories beside MoM with 4, attention with 1 and 2 heads), the settings that differ are appended, e.g.
`mom (num_memories=8)`, so different models are never merged.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pandas as pd

from mom_bench import files, records

log = logging.getLogger(__name__)

KEY = ["sweep", "model", "d_model", "train"]
SLICE = re.compile(r"^L(\d+)_n(\d+)$")
# Whole numbers that some rows lack: nullable Int64, so that CSV says 16384, not 16384.0.
INTEGERS = ["memories", "topk", "state_total", "state_active", "state_total_bytes", "state_active_bytes",
            "params", "best_epoch"]
# Carried from the chosen runs into the best table (the first run's value: equal across seeds).
CARRIED = ["mixer", "memories", "topk", "state_total", "state_active", "state_total_bytes",
           "state_active_bytes", "params", "device_name"]


class NoRecords(FileNotFoundError):
    """The results root holds no run record."""


@dataclass
class Results:
    """Everything a report shows, as tables; `load` builds it, the figures and the notebook read it."""

    root: Path
    runs: pd.DataFrame    # one row per MQAR training run
    best: pd.DataFrame    # best lr per KEY, mean and std over seeds
    bench: pd.DataFrame   # one row per timing of a benchmark record (empty if there is none)
    scores: pd.DataFrame  # one row per (record, task) score (empty if there is none)
    failed: pd.DataFrame  # every record whose status is not complete, any kind: kind, run_id, reason
    invalid: pd.DataFrame  # every record set aside as invalid (records.set_aside): path, reason


# ----------------------------------------------------------------------------------------------- tables
def slice_columns(df: pd.DataFrame) -> List[str]:
    """Accuracy columns (`L64_n4`, ...), ordered by sequence length then number of pairs."""
    cols = [c for c in df.columns if isinstance(c, str) and SLICE.match(c)]
    return sorted(cols, key=lambda c: tuple(int(x) for x in SLICE.match(c).groups()))


def _kind(rec: Dict[str, Any]) -> str:
    return rec.get("kind", "mqar")  # records.problem has checked it; MQAR records once carried none


def _labels(models: Sequence[Dict[str, Any]]) -> List[str]:
    """records.model_label, plus the settings that differ between configs sharing that label."""
    base = [records.model_label(m) for m in models]
    varying: Dict[str, List[str]] = {}
    for label in set(base):
        ms = [m for m, b in zip(models, base) if b == label]
        keys = sorted(set().union(*ms) - {"d_model"})
        varying[label] = [k for k in keys if len({json.dumps(m.get(k), sort_keys=True) for m in ms}) > 1]
    return [b + (" (" + ", ".join(f"{k}={m.get(k)}" for k in varying[b]) + ")" if varying[b] else "")
            for b, m in zip(base, models)]


def runs_frame(recs: List[Dict[str, Any]]) -> pd.DataFrame:
    """One row per MQAR training record; one accuracy column per test slice (named like `L64_n4`)."""
    recs = [r for r in recs if _kind(r) == "mqar"]
    labels = _labels([r["config"]["model"] for r in recs])
    rows = []
    for r, label in zip(recs, labels):
        c, m = r["config"], r["config"]["model"]
        routed = "mom" in records.model_label(m)
        state = (r.get("model") or {}).get("state_size") or {}
        rows.append({
            "sweep": c.get("sweep_name", ""), "model": label, "mixer": m["mixer"], "d_model": m["d_model"],
            "memories": m.get("num_memories") if routed else None, "topk": m.get("topk") if routed else None,
            "train": records.train_label(c["data"]), "lr": c["optim"]["lr"], "seed": c.get("seed"),
            "status": r.get("status", "failed"), **(r.get("accuracy") or {}), "mean": r.get("mean_accuracy"),
            "state_total": state.get("total"), "state_active": state.get("active"),
            "state_total_bytes": state.get("total_bytes"), "state_active_bytes": state.get("active_bytes"),
            "params": (r.get("model") or {}).get("params"),
            "throughput_tokens_per_s": r.get("throughput_tokens_per_s"),
            "device_name": (r.get("hardware") or {}).get("device_name"),
            "best_epoch": r.get("best_epoch"), "wall_time_s": r.get("wall_time_s"),
            "run_id": r["run_id"], "reason": r.get("reason"),
        })
    df = pd.DataFrame(rows)
    if len(df):
        fixed = [c for c in df.columns if not SLICE.match(c)]
        order = fixed[:fixed.index("mean")] + slice_columns(df) + fixed[fixed.index("mean"):]
        df = df[order].sort_values(KEY + ["lr", "seed", "run_id"]).reset_index(drop=True)
        df = _integers(df)
    return df


def _integers(df: pd.DataFrame) -> pd.DataFrame:
    for col in INTEGERS:
        if col in df.columns:
            df[col] = df[col].astype("Float64").round().astype("Int64")
    return df


def _floats(values: pd.Series):
    """A numeric column as a float numpy array (NaN where missing), for matplotlib."""
    return pd.to_numeric(values, errors="coerce").astype("Float64").to_numpy(dtype=float, na_value=float("nan"))


def best_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Best lr per KEY by accuracy averaged over seeds; mean and std over the seeds at that lr."""
    metrics = slice_columns(runs) + ["mean"]
    rows = []
    for key, g in runs.groupby(KEY, sort=True, dropna=False):
        done = g[(g["status"] == "complete") & g["mean"].notna()]
        row: Dict[str, Any] = dict(zip(KEY, key))
        row.update(runs=len(g), failed=int((g["status"] != "complete").sum()))
        if len(done):
            lr = done.groupby("lr")["mean"].mean().idxmax()
            sel = done[done["lr"] == lr]
            row.update(lr=lr, n_seeds=int(sel["seed"].nunique()), status="complete", reason=None)
            for col in metrics:
                row[col] = sel[col].mean()
                row[f"{col}_std"] = sel[col].std(ddof=1) if len(sel) > 1 else float("nan")
            row.update({c: sel[c].iloc[0] for c in CARRIED})
            row["throughput_tokens_per_s"] = sel["throughput_tokens_per_s"].mean()
            row["run_ids"] = " ".join(sel["run_id"])
        else:  # every run of the group failed: one row says so
            first = g.iloc[0]
            row.update(lr=float("nan"), n_seeds=0, status="failed", reason=first["reason"],
                       run_ids=" ".join(g["run_id"]), **{c: first[c] for c in CARRIED})
        rows.append(row)
    best = pd.DataFrame(rows)
    stds = [f"{c}_std" for c in metrics]
    front = KEY + ["lr", "n_seeds", "status"]
    back = CARRIED + ["throughput_tokens_per_s", "runs", "failed", "reason", "run_ids"]
    best = best.reindex(columns=front + metrics + stds + back)
    best = best.sort_values(KEY, key=lambda col: col.map(_train_order) if col.name == "train" else col)
    return _integers(best.reset_index(drop=True))


def bench_frame(recs: List[Dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for r in recs:
        if _kind(r) != "bench" or r.get("status", "complete") != "complete":
            continue
        device = (r.get("hardware") or {}).get("device_name")
        for t in r.get("timings") or []:
            tps = t.get("tokens_per_s")
            if tps is None and t.get("ms") and t.get("batch_size"):
                tps = t["batch_size"] * t["seq_len"] / (t["ms"] / 1e3)
            rows.append({"run_id": r.get("run_id"), "device_name": device, "name": t["name"],
                         "pass": t.get("pass", "fwd"), "seq_len": t["seq_len"],
                         "batch_size": t.get("batch_size"), "ms": t.get("ms"), "tokens_per_s": tps})
    return pd.DataFrame(rows, columns=["run_id", "device_name", "name", "pass", "seq_len", "batch_size",
                                       "ms", "tokens_per_s"])


def scores_frame(recs: List[Dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for r in recs:
        if _kind(r) != "eval" or r.get("status", "complete") != "complete":
            continue
        model = r.get("model") or {}
        cfg_model = (r.get("config") or {}).get("model")
        label = model.get("label") or (records.model_label(cfg_model) if cfg_model else r.get("run_id"))
        d_model = model.get("d_model") or (cfg_model or {}).get("d_model")
        for task, value in r["scores"].items():
            rows.append({"run_id": r.get("run_id"), "model": label, "d_model": d_model, "task": task,
                         "score": value})
    return pd.DataFrame(rows, columns=["run_id", "model", "d_model", "task", "score"])


def load(root: str | os.PathLike) -> Results:
    """Read every record under `root`; raise NoRecords when there is none."""
    root = Path(root)
    recs, bad = records.scan(root) if root.is_dir() else ([], [])
    if not recs and not bad:
        raise NoRecords(f"no run records under {root} (looked for runs/*.json at any depth)")
    runs = runs_frame(recs)
    failed = pd.DataFrame([{"kind": _kind(r), "run_id": r.get("run_id"), "reason": r.get("reason")}
                           for r in recs if r.get("status", "complete") != "complete"],
                          columns=["kind", "run_id", "reason"])
    invalid = pd.DataFrame(bad, columns=["path", "reason"])
    return Results(root=root, runs=runs, best=best_table(runs) if len(runs) else pd.DataFrame(columns=KEY),
                   bench=bench_frame(recs), scores=scores_frame(recs), failed=failed, invalid=invalid)


# --------------------------------------------------------------------------------------- table writing
def _fmt_params(v: float) -> str:
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k" if v >= 1e3 else f"{v:.0f}"


def shown_table(best: pd.DataFrame, sweep: Optional[str] = None, pm: str = "±") -> pd.DataFrame:
    """The best table of one sweep as strings: `0.912 ± 0.013` where several seeds were averaged."""
    b = best if sweep is None else best[best["sweep"] == sweep]
    slices = [c for c in slice_columns(b) if b[c].notna().any()]

    def acc(row, col):
        v, s = row[col], row.get(f"{col}_std")
        if pd.isna(v):
            return "-"
        return f"{v:.3f} {pm} {s:.3f}" if pd.notna(s) else f"{v:.3f}"

    def num(v, fmt):
        return "-" if v is None or pd.isna(v) else fmt(v)

    out = pd.DataFrame({
        "model": b["model"], "d_model": b["d_model"].map(str), "train": b["train"],
        "lr": b["lr"].map(lambda v: num(v, "{:g}".format)), "seeds": b["n_seeds"].map(str),
        "status": b["status"],
        **{c: [acc(r, c) for _, r in b.iterrows()] for c in slices + ["mean"]},
        "state bytes": b["state_total_bytes"].map(lambda v: num(v, "{:.0f}".format)),
        "active bytes": b["state_active_bytes"].map(lambda v: num(v, "{:.0f}".format)),
        "params": b["params"].map(lambda v: num(v, _fmt_params)),
        "failed": [f"{f}/{n}" for f, n in zip(b["failed"], b["runs"])],
    })
    return out.reset_index(drop=True)


def _latex_escape(s: str) -> str:
    return re.sub(r"([_%&#$])", r"\\\1", str(s))


def _count(runs: pd.DataFrame) -> str:
    n, failed = len(runs), int((runs["status"] != "complete").sum()) if len(runs) else 0
    return f"{n} run{'s' * (n != 1)}, {failed} failed"


def markdown(res: Results) -> str:
    runs, failed = res.runs, res.failed
    lines = [f"# mom_bench report: {res.root.resolve().name}", "",
             f"{_count(runs)}. Best learning rate per (model, d_model, train): the lr "
             "with the highest accuracy averaged over seeds; accuracies are the mean over seeds at that lr, "
             "± the sample standard deviation where several seeds exist. `failed` counts failed runs of "
             "all learning rates.", ""]
    for sweep in sorted(res.best["sweep"].unique()) if len(runs) else []:
        lines += [f"## {sweep}", "", f"{_count(runs[runs['sweep'] == sweep])}.", "",
                  shown_table(res.best, sweep).to_markdown(index=False, disable_numparse=True), ""]
    if len(res.bench):
        b = res.bench.assign(tokens_per_s=res.bench["tokens_per_s"].map("{:.3g}".format))
        lines += ["## Benchmarks", "", b.drop(columns=["run_id"]).to_markdown(index=False), ""]
    if len(res.scores):
        lines += ["## Real-task scores", "",
                  res.scores.pivot_table(index=["model", "d_model"], columns="task", values="score")
                  .reset_index().to_markdown(index=False, floatfmt=".3f"), ""]
    if len(failed):
        # One line each: reasons such as CUDA out-of-memory messages span several lines.
        lines += ["## Failed runs", ""] + [f"- `{r.run_id}`: {' '.join(str(r.reason).split())[:300]}"
                                           for r in failed.itertuples()] + [""]
    if len(res.invalid):
        lines += ["## Invalid records", "", "Set aside (moved, not deleted) and not counted; a sweep runs "
                  "their points again.", ""] + [f"- `{r.path}`: {r.reason}" for r in res.invalid.itertuples()] + [""]
    return "\n".join(lines)


def latex(res: Results) -> str:
    """One tabular per sweep (pandas to_latex, which needs jinja2); strings escaped here."""
    parts = []
    for sweep in sorted(res.best["sweep"].unique()) if len(res.runs) else []:
        t = shown_table(res.best, sweep, pm=r"$\pm$")
        t = t.apply(lambda col: col.map(lambda v: v if "$" in v else _latex_escape(v)))
        t.columns = [_latex_escape(c) for c in t.columns]
        caption = _latex_escape(f"{sweep}: best learning rate per (model, d_model, train); mean over seeds")
        parts.append(t.to_latex(index=False, escape=False, caption=caption,
                                label=f"tab:{re.sub(r'[^A-Za-z0-9]+', '-', sweep)}"))
    return "\n".join(parts)


def write_tables(res: Results, out: Path) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "runs.csv", out / "table.csv", out / "table.md", out / "table.tex"]
    res.runs.to_csv(paths[0], index=False)
    res.best.to_csv(paths[1], index=False)
    paths[2].write_text(markdown(res))
    paths[3].write_text(latex(res))
    if len(res.bench):
        paths.append(out / "bench.csv")
        res.bench.to_csv(paths[-1], index=False)
    if len(res.scores):
        paths.append(out / "scores.csv")
        res.scores.to_csv(paths[-1], index=False)
    return paths


# -------------------------------------------------------------------------------------------- figures
# matplotlib.figure.Figure, not pyplot: no backend to choose on servers, nothing left open, and a notebook
# shows a returned Figure inline.
def _figure(n_panels: int, width: float = 4.2, height: float = 3.8):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * n_panels + 1.5, height), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False, sharey=True)[0]
    return fig, axes


def _colors(labels) -> Dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(set(labels)) <= 10 else "tab20"]
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(sorted(set(labels)))}


def _legend(fig, axes) -> None:
    handles, labels = [], []
    for ax in axes:  # a model may be missing from the first panel
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    order = sorted(range(len(labels)), key=lambda i: (labels[i] == "no complete run", labels[i]))
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]  # the failure marker last
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize="small")


def _train_order(label: str) -> tuple:
    """`L64_n4+L128_n8` sorts by its numbers, so L64 comes before L256."""
    return tuple(int(x) for x in re.findall(r"\d+", str(label)))


def _si(x: float) -> str:
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= f:
            return f"{x / f:g}{unit}"
    return f"{x:g}"


def _log_x(ax) -> None:
    """Log x axis labelled 10k, 100k, 1M; within two decades also 20k, 50k, ... (call after plotting)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    narrow = hi / lo < 100

    def minor(x, _pos):
        mantissa = round(x / 10 ** math.floor(math.log10(x)), 6)
        return _si(x) if narrow and mantissa in (2, 5) else ""

    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: _si(x)))
    ax.xaxis.set_minor_formatter(FuncFormatter(minor))


def _slice_title(col: str) -> str:
    length, n = SLICE.match(col).groups()
    return f"test L={length}, n={n}"


def _fail_marker(ax, x, color, label="no complete run") -> None:
    ax.plot(x, [0.0] * len(x), linestyle="none", marker="x", markersize=9, mew=2, color=color, clip_on=False)
    ax.plot([], [], linestyle="none", marker="x", color="0.3", label=label)


def plot_accuracy_vs_d_model(best: pd.DataFrame, sweep: Optional[str] = None):
    """Zoology figure 2: accuracy against d_model, one panel per test slice, one line per model (best lr,
    mean over seeds with the std as error bars; x at 0 where every run failed)."""
    colors = _colors(best["model"])
    b = best if sweep is None else best[best["sweep"] == sweep]
    slices = [c for c in slice_columns(b) if b[c].notna().any()] or ["mean"]
    fig, axes = _figure(len(slices))
    widths = sorted(b["d_model"].unique())
    for ax, col in zip(axes, slices):
        done = b[(b["status"] == "complete") & b[col].notna()]
        several = done["train"].nunique() > 1  # one line per (model, train) when trainings share a slice
        for (model, train), g in done.groupby(["model", "train"]):
            g = g.sort_values("d_model")
            ax.errorbar(_floats(g["d_model"]), _floats(g[col]), yerr=_floats(g[f"{col}_std"].fillna(0)),
                        marker="o", capsize=3,
                        color=colors[model], label=f"{model} [{train}]" if several else model)
        fails = b[b["status"] != "complete"]
        for model, g in fails.groupby("model"):
            _fail_marker(ax, list(_floats(g["d_model"])), colors[model])
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])  # 64, not 2^6
        ax.minorticks_off()
        ax.set_title(_slice_title(col) if col != "mean" else "mean accuracy")
        ax.set_xlabel("d_model")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (best lr)")
    _legend(fig, axes)
    if sweep:
        fig.suptitle(sweep)
    return fig


def plot_accuracy_vs_state(best: pd.DataFrame, sweep: Optional[str] = None):
    """Based figure 2: mean accuracy against recurrent state size in bytes (log x), one line per model,
    one panel per training data. Models whose active state is smaller than their total (MoM) get a second,
    dashed line at the active state."""
    colors = _colors(best["model"])
    b = best if sweep is None else best[best["sweep"] == sweep]
    trains = sorted(b["train"].unique(), key=_train_order)
    fig, axes = _figure(len(trains), width=5.0)
    for ax, train in zip(axes, trains):
        t = b[b["train"] == train]
        done = t[t["status"] == "complete"]
        for model, g in done.groupby("model"):
            two = (g["state_active_bytes"] != g["state_total_bytes"]).any()
            for col, style, face, what in [("state_total_bytes", "-", colors[model], "total state"),
                                           ("state_active_bytes", "--", "white", "active state")][:2 if two else 1]:
                gg = g.dropna(subset=[col]).sort_values(col)
                ax.errorbar(_floats(gg[col]), _floats(gg["mean"]), yerr=_floats(gg["mean_std"].fillna(0)),
                            marker="o", markerfacecolor=face, capsize=3, linestyle=style, color=colors[model],
                            label=f"{model} ({what})" if two else model)
        fails = t[(t["status"] != "complete") & t["state_total_bytes"].notna()]
        for model, g in fails.groupby("model"):
            _fail_marker(ax, list(_floats(g["state_total_bytes"])), colors[model])
        _log_x(ax)
        ax.set_xlabel("recurrent state (bytes, fp32)")
        ax.set_title(f"train {train}")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("mean accuracy (best lr)")
    _legend(fig, axes)
    if sweep:
        fig.suptitle(sweep)
    return fig


def plot_throughput(bench: pd.DataFrame):
    """Throughput (tokens/s) against sequence length from benchmark records, log-log, one panel per pass
    (fwd, fwd+bwd), one line per implementation."""
    colors = _colors(bench["name"])
    passes = sorted(bench["pass"].unique())
    fig, axes = _figure(len(passes), width=5.0)
    for ax, p in zip(axes, passes):
        for name, g in bench[bench["pass"] == p].groupby("name"):
            g = g.groupby("seq_len", as_index=False)["tokens_per_s"].mean()
            ax.plot(_floats(g["seq_len"]), _floats(g["tokens_per_s"]), marker="o", color=colors[name], label=name)
        lengths = sorted(bench["seq_len"].unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_title(p)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("throughput (tokens/s)")
    _legend(fig, axes)
    devices = ", ".join(sorted(bench["device_name"].dropna().unique()))
    if devices:
        fig.suptitle(devices)
    return fig


def plot_task_scores(scores: pd.DataFrame):
    """Real-task scores: one group of horizontal bars per task, one bar per model (mean over its
    records)."""
    s = scores.copy()
    several = s.groupby("model")["d_model"].nunique() > 1
    s["label"] = [f"{m} d{d}" if several.get(m, False) else m for m, d in zip(s["model"], s["d_model"])]
    table = s.pivot_table(index="task", columns="label", values="score", aggfunc="mean")
    colors = _colors(table.columns)
    # Task names (jrt_swde_twice, ...) are long: one row each on the y axis, they never run into each
    # other, however many tasks there are.
    fig, axes = _figure(1, width=5.0, height=max(2.5, 0.25 * len(table.index) * (len(table.columns) + 1)))
    ax = axes[0]
    height = 0.8 / len(table.columns)
    for i, label in enumerate(table.columns):
        ys = [j + (i - (len(table.columns) - 1) / 2) * height for j in range(len(table.index))]
        ax.barh(ys, table[label].fillna(0), height=height, color=colors[label], label=label)
    ax.set_yticks(range(len(table.index)), list(table.index))
    ax.invert_yaxis()  # the first task on top
    ax.set_xlabel("score")
    ax.set_xlim(0, 1.02)
    ax.grid(alpha=0.3, axis="x")
    _legend(fig, axes)
    return fig


@dataclass
class FigureSpec:
    """One figure: `function(getattr(results, table), **kwargs)` saved as figures/<stem>.{png,svg}."""

    stem: str
    function: str
    table: str
    kwargs: Dict[str, Any]

    def call(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"report.{self.function}(res.{self.table}{args})"

    def draw(self, res: Results):
        return globals()[self.function](getattr(res, self.table), **self.kwargs)

    def caption(self) -> str:
        """The first paragraph of the figure function's docstring, as one line."""
        return " ".join(globals()[self.function].__doc__.split("\n\n")[0].split())


def figure_specs(res: Results) -> List[FigureSpec]:
    """The figures whose data exist: per sweep accuracy-vs-width and accuracy-vs-state; throughput if there
    are benchmark records; task scores if there are eval records."""
    specs = []
    for sweep in sorted(res.best["sweep"].unique()) if len(res.runs) else []:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", sweep) or "runs"
        specs.append(FigureSpec(f"accuracy_vs_d_model_{slug}", "plot_accuracy_vs_d_model", "best",
                                {"sweep": sweep}))
        if res.best.loc[res.best["sweep"] == sweep, "state_total_bytes"].notna().any():
            specs.append(FigureSpec(f"accuracy_vs_state_{slug}", "plot_accuracy_vs_state", "best",
                                    {"sweep": sweep}))
    if len(res.bench):
        specs.append(FigureSpec("throughput_vs_seq_len", "plot_throughput", "bench", {}))
    if len(res.scores):
        specs.append(FigureSpec("task_scores", "plot_task_scores", "scores", {}))
    return specs


def write_figures(res: Results, out: Path) -> List[Path]:
    (out / "figures").mkdir(parents=True, exist_ok=True)
    paths = []
    for spec in figure_specs(res):
        fig = spec.draw(res)
        for ext in ("png", "svg"):
            paths.append(out / "figures" / f"{spec.stem}.{ext}")
            fig.savefig(paths[-1], dpi=150, bbox_inches="tight")
    return paths


# ------------------------------------------------------------------------------------------- notebook
def notebook(res: Results, out: Path) -> Dict[str, Any]:
    """An nbformat-4 notebook (a plain dict) that rebuilds `res` and draws every figure with this module.
    The root is written relative to `out`, so a report folder moved together with its results still runs."""
    root = os.path.relpath(res.root.resolve(), out.resolve())

    def cell(kind: str, source: str) -> Dict[str, Any]:
        c = {"cell_type": kind, "metadata": {}, "source": source}
        return {**c, "outputs": [], "execution_count": None} if kind == "code" else c

    cells = [
        cell("markdown", f"# mom_bench report\n\nRecords under `{root}` (relative to this notebook), read "
                         "with `mom_bench.report`; `python -m mom_bench report` wrote this notebook."),
        cell("code", "%matplotlib inline\nimport pandas as pd\nfrom mom_bench import report\n\n"
                     f"res = report.load({root!r})\nprint(len(res.runs), 'runs,', len(res.failed), 'failed')"),
        cell("markdown", "## Best learning rate per (model, d_model, train), mean over seeds"),
        cell("code", "res.best"),
    ]
    for spec in figure_specs(res):
        cells += [cell("markdown", f"## {spec.stem}\n\n{spec.caption()}"), cell("code", spec.call())]
    if len(res.failed):
        cells += [cell("markdown", "## Failed runs"), cell("code", "res.failed")]
    if len(res.invalid):
        cells += [cell("markdown", "## Invalid records (set aside, not counted)"), cell("code", "res.invalid")]
    cells += [cell("markdown", "## Every run"), cell("code", "res.runs")]
    return {"nbformat": 4, "nbformat_minor": 5, "cells": cells,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                         "language_info": {"name": "python"}}}


def write_notebook(res: Results, out: Path, execute: bool = True) -> List[Path]:
    """report.ipynb; executed and exported to report.html when nbclient, ipykernel and nbconvert are
    installed (otherwise the unexecuted notebook, with a warning)."""
    nb_dict = notebook(res, out)
    path = out / "report.ipynb"
    try:
        import nbformat
    except ImportError:
        log.warning("nbformat is not installed: report.ipynb written unexecuted, no report.html")
        path.write_text(json.dumps(nb_dict, indent=1))
        return [path]
    nb = nbformat.from_dict(nb_dict)
    for i, c in enumerate(nb.cells):
        c["id"] = f"cell-{i}"
    nbformat.validate(nb)
    paths = [path]
    if execute:
        try:
            import ipykernel  # noqa: F401 -- the kernel that nbclient starts
            from nbclient import NotebookClient
        except ImportError:
            log.warning("nbclient or ipykernel is not installed: report.ipynb written unexecuted")
            execute = False
        else:
            # Raises CellExecutionError, naming the cell, if any cell fails.
            NotebookClient(nb, timeout=600, kernel_name="python3", extra_arguments=["--log-level=ERROR"],
                           resources={"metadata": {"path": str(out)}}).execute()
    nbformat.write(nb, path)
    if execute:
        try:
            from nbconvert import HTMLExporter
        except ImportError:
            log.warning("nbconvert is not installed: no report.html")
        else:
            exporter = HTMLExporter()
            exporter.log.setLevel(logging.ERROR)  # not a warning per figure that it has no alt text
            html, _ = exporter.from_notebook_node(nb)
            paths.append(out / "report.html")
            paths[-1].write_text(html)
    return paths


# ------------------------------------------------------------------------------------------ the report
class ReportError(RuntimeError):
    """The report could not be written completely; the message says what is missing."""


def write_report(root: str | os.PathLike, out: Optional[str | os.PathLike] = None,
                 execute: bool = True) -> List[Path]:
    """Write tables, figures and the notebook of every record under `root` into `out` (default
    `<root>/report`); return the written paths. Raises NoRecords when `root` holds no record.

    The report is built in a temporary folder beside `out` and renamed into place, so `out` always holds
    one whole report: the previous one if this one could not be written (a full disk), never a mix. A
    notebook that fails to execute is kept unexecuted and raises ReportError once the rest is in place."""
    res = load(root)
    out = Path(out) if out is not None else Path(root) / "report"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = files.temp_dir(out.parent, out.name)
    try:
        written = write_tables(res, tmp) + write_figures(res, tmp)
        try:
            written += write_notebook(res, tmp, execute=execute)
            error = None
        except Exception as exc:  # noqa: BLE001 -- the tables and figures are still good: keep them
            written += write_notebook(res, tmp, execute=False)
            error = exc
        files.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if error is not None:
        raise ReportError(f"the report notebook failed to execute ({type(error).__name__}: {error}); tables, "
                          f"figures and the unexecuted notebook are in {out}") from error
    return [out / p.relative_to(tmp) for p in written]


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mom_bench report",
                                     description="Tables, figures and a notebook from every run record "
                                                 "under a results root (runs/*.json at any depth).")
    parser.add_argument("root", help="results root, e.g. outputs/ or outputs/zoology_fig2")
    parser.add_argument("--out", help="output folder (default: <root>/report)")
    parser.add_argument("--no-execute", action="store_true",
                        help="write the notebook without executing it (and without the HTML export)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        paths = write_report(args.root, args.out, execute=not args.no_execute)
    except (NoRecords, ReportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"report written to {paths[0].parent}:")
    for p in paths:
        print(f"  {p}")
    return 0
