"""Records as tables: one row per MQAR run (its accuracies those of the epoch its config's
`reported_epoch` names, best or last; both means are columns), the best learning rate per (sweep, model,
d_model, train) over seeds, benchmark timings, real-task scores, failures and invalid records (`load`)."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence

import pandas as pd

from mom_bench import records

KEY = ["sweep", "model", "d_model", "train"]
SLICE = re.compile(r"^L(\d+)_n(\d+)$")
# Whole numbers that some rows lack: nullable Int64, so that CSV says 16384, not 16384.0.
INTEGERS = ["memories", "topk", "state_total", "state_active", "state_total_bytes", "state_active_bytes",
            "state_mixer_bytes", "params", "best_epoch"]
# Carried from the chosen runs into the best table (the first run's value: equal across seeds).
CARRIED = ["mixer", "epoch", "memories", "topk", "state_total", "state_active", "state_total_bytes",
           "state_active_bytes", "state_mixer_bytes", "params", "device_name"]


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
        history = r.get("eval_history") or []
        last = r.get("last_accuracy") or (history[-1].get("accuracy") if history else None)
        last_mean = r.get("last_mean_accuracy", history[-1].get("mean") if history else None)
        shown_epoch = c.get("reported_epoch", "best")  # Zoology's protocol reports the last epoch
        shown, shown_mean = ((last, last_mean) if shown_epoch == "last" else (r.get("accuracy"), r.get("mean_accuracy")))
        own = _own_state(state, m)
        rows.append({
            "sweep": c.get("sweep_name", ""), "model": label, "mixer": m["mixer"], "d_model": m["d_model"],
            "memories": m.get("num_memories") if routed else None, "topk": m.get("topk") if routed else None,
            "train": records.train_label(c["data"]), "lr": c["optim"]["lr"], "seed": c.get("seed"),
            "status": r.get("status", "failed"), **(shown or {}), "mean": shown_mean,
            "epoch": shown_epoch, "mean_best_epoch": r.get("mean_accuracy"), "mean_last_epoch": last_mean,
            "state_total": state.get("total"), "state_active": state.get("active"),
            "state_total_bytes": state.get("total_bytes"), "state_active_bytes": state.get("active_bytes"),
            "state_mixer_bytes": own,
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


def _own_state(state: Dict[str, Any], model: Dict[str, Any]) -> Any:
    """fp32 bytes of one layer of the model's own sequence mixer (this project's per-mixer count): the last
    layer's mixer of a pattern (a Based-figure-2 hybrid's [base_conv, mixer]: the mixer), else `mixer`.
    None for records written before per-mixer counts existed."""
    per_mixer = state.get("per_mixer") or {}
    name = (model.get("pattern") or [model["mixer"]])[-1]
    return (per_mixer.get(name) or {}).get("bytes")


def _integers(df: pd.DataFrame) -> pd.DataFrame:
    for col in INTEGERS:
        if col in df.columns:
            df[col] = df[col].astype("Float64").round().astype("Int64")
    return df


def best_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Best lr per KEY by accuracy averaged over seeds; mean and std over the seeds at that lr."""
    # `mean` and the slices are the accuracy of the epoch the sweep reports (`epoch`: best or last); the
    # other epoch's mean is kept beside it, so the table can say both.
    metrics = slice_columns(runs) + ["mean", "mean_best_epoch", "mean_last_epoch"]
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


def _train_order(label: str) -> tuple:
    """`L64_n4+L128_n8` sorts by its numbers, so L64 comes before L256."""
    return tuple(int(x) for x in re.findall(r"\d+", str(label)))
