"""The MoM study: does routing tokens to several memories beat one memory of the same state?

Its sweeps (conf/sweep/mom_study_*.yaml) run MoM beside single memories of the same kind whose heads make
the same total state (E + 1 memories of H heads: (E + 1) H heads) or the same active state ((top-k + 1) H
heads). Here the pairs are found by their numbers, not by their names:

- `config_state` is a model config's recurrent state in values, {"total", "active"}: the state_size of
  the model it builds;
- `match` pairs every MoM point with each single memory of the same kind, sweep, training data, width
  and depth whose total state equals MoM's total ("total") or MoM's active state ("active");
- `write_study`, called by the report, writes `mom_study/` when the records hold such pairs or router
  statistics: per point the mean and std over seeds at its best lr (the report's best table), per pair
  the seeds on which MoM wins and the mean and std of MoM's accuracy minus the single memory's (runs
  paired by seed, each side at its own best lr), the router statistics of every MoM run, and figures.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pandas as pd

from mom_bench import records
from mom_bench.report.frames import slice_columns

# A pair shares these; the config-level check adds lr and seed, the report pairs seeds itself.
MATCH_KEY = ("sweep", "train", "d_model", "n_layers", "kind")
BASES = ("total", "active")  # MoM's state that the single memory's total equals
TIE = 1e-9  # accuracies are fractions of counts: equal counts give equal floats


def _complete(model: Dict[str, Any]) -> Dict[str, Any]:
    """A model config with ModelConfig's defaults for the keys it lacks (records older than those keys)."""
    from dataclasses import asdict

    from mom_bench.models import ModelConfig

    return {**asdict(ModelConfig()), **model}


def memory_kind(model: Dict[str, Any]) -> Optional[str]:
    """The memory kind of a model config whose every layer is one memory mixer (MoM: model.memory), else
    None (attention, the Zoology mixers, hybrids)."""
    from mom_bench.models import MIXERS

    model = _complete(model)
    if model.get("pattern"):
        return None
    if model["mixer"] == "mom":
        return model["memory"]
    return getattr(MIXERS.get(model["mixer"]), "keywords", {}).get("kind")


def config_state(model: Dict[str, Any]) -> Optional[Dict[str, int]]:
    """{"total", "active"} state in values of a memory-mixer model config (None for other models): the
    model's own `state_size`, built on the meta device (no memory, no initialisation) so the arithmetic
    lives in one place. A memory mixer's state does not depend on the sequence length."""
    import torch

    from mom_bench.models import ModelConfig, build_model

    if memory_kind(model) is None:
        return None
    with torch.device("meta"):
        return build_model(ModelConfig(**_complete(model)), vocab_size=1).state_size(1)


def match(points: Sequence[Dict[str, Any]], key: Sequence[str] = MATCH_KEY) -> List[Tuple[int, int, str]]:
    """(MoM point, single point, basis) index triples: points are dicts with `key`'s fields, "routed", "total"
    and "active"; a single memory pairs with a MoM point where its total equals MoM's `basis` state."""
    singles: Dict[tuple, List[int]] = {}
    for j, p in enumerate(points):
        if not p["routed"]:
            singles.setdefault(tuple(p[k] for k in key), []).append(j)
    return [(i, j, basis) for i, p in enumerate(points) if p["routed"] for basis in BASES
            for j in singles.get(tuple(p[k] for k in key), []) if points[j]["total"] == p[basis]]


# ------------------------------------------------------------------------------------- from records
def _describe(model: Dict[str, Any], kind: str) -> str:
    """A series of the figures: one single memory per kind, one MoM per setting of its knobs."""
    if model["mixer"] != "mom":
        return f"{kind} (one memory)"
    shared = ", shared" if model["shared_memory"] else ""
    return f"MoM {kind} E{model['num_memories']} top-{model['topk']}{shared}, aux {model['aux_loss_coef']:g}"


def _router(rec: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The best epoch's router statistics of a record (mom_bench.records), [] where there are none."""
    history, best = rec.get("eval_history") or [], rec.get("best_epoch")
    entry = next((h for h in history if h.get("epoch") == best), {})
    return entry.get("router") or []


def study_runs(res) -> pd.DataFrame:
    """The report's runs of memory-mixer models, with kind, role, series, depth and router statistics."""
    recs = {r["run_id"]: r for r in records.load_records(res.root) if r.get("kind", "mqar") == "mqar"}
    rows = []
    for _, run in res.runs.iterrows():
        model = recs[run["run_id"]]["config"]["model"] if run["run_id"] in recs else None
        kind = memory_kind(model) if model else None
        if kind is None:
            continue
        model = _complete(model)
        rows.append({**run, "kind": kind, "routed": model["mixer"] == "mom", "n_layers": model["n_layers"],
                     "series": _describe(model, kind), "router": _router(recs[run["run_id"]])})
    return pd.DataFrame(rows)


def study_points(res, runs: pd.DataFrame) -> pd.DataFrame:
    """The report's best table (best lr per point, mean and std over seeds) for the study's models."""
    info = runs.set_index(["sweep", "run_id"])  # equal configs in two sweeps share a run id
    first = [(s, str(ids).split()[0]) for s, ids in zip(res.best["sweep"], res.best["run_ids"])]
    best = res.best[[key in info.index for key in first]].copy()
    first = [key for key in first if key in info.index]  # a point's settings are equal across its runs
    for col in ("kind", "routed", "n_layers", "series"):
        best[col] = info.loc[first, col].to_numpy()
    best["total"], best["active"] = best["state_total"], best["state_active"]
    return best.reset_index(drop=True)


def paired(points: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (matched pair, metric): MoM minus the single memory, seed by seed. The metrics: the mean
    accuracy, and each test slice's where there are several (the Based protocol's unseen lengths)."""
    done = points[(points["status"] == "complete") & points["total"].notna()].reset_index(drop=True)
    by_id = runs.set_index(["sweep", "run_id"])
    rows = []
    for i, j, basis in match(done.to_dict("records")):
        mom, one = done.iloc[i], done.iloc[j]
        seeds = {side: by_id.loc[[(p["sweep"], r) for r in str(p["run_ids"]).split()]].set_index("seed")
                 for side, p in (("mom", mom), ("one", one))}
        common = sorted(set(seeds["mom"].index) & set(seeds["one"].index))
        slices = [c for c in slice_columns(done) if pd.notna(mom[c])]
        for metric in ["mean"] + (slices if len(slices) > 1 else []):
            diff = [float(seeds["mom"].loc[s, metric] - seeds["one"].loc[s, metric]) for s in common
                    if pd.notna(seeds["mom"].loc[s, metric]) and pd.notna(seeds["one"].loc[s, metric])]
            if not diff:
                continue
            rows.append({
                "sweep": mom["sweep"], "train": mom["train"], "kind": mom["kind"], "d_model": mom["d_model"],
                "basis": basis, "state": int(mom[basis]), "mom": mom["model"], "single": one["model"],
                "mom_lr": mom["lr"], "single_lr": one["lr"], "metric": metric, "seeds": len(diff),
                "wins": sum(d > TIE for d in diff), "ties": sum(abs(d) <= TIE for d in diff),
                "losses": sum(d < -TIE for d in diff), "mean_diff": sum(diff) / len(diff),
                "std_diff": pd.Series(diff).std(ddof=1) if len(diff) > 1 else float("nan"),
                "mom_mean": mom[metric], "single_mean": one[metric], "diffs": " ".join(f"{d:.4g}" for d in diff)})
    return pd.DataFrame(rows)


def router_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (MoM run, layer): entropy, its share of the uniform router's, the fractions per memory
    sorted from the most used (memory indices mean nothing across seeds; the sorted shares show balance)."""
    rows = [{"sweep": r["sweep"], "train": r["train"], "series": r["series"], "model": r["model"],
             "d_model": r["d_model"], "lr": r["lr"], "seed": r["seed"], "module": layer["module"],
             "entropy": layer["entropy"], "max_entropy": layer["max_entropy"],
             "entropy_ratio": layer["entropy"] / layer["max_entropy"] if layer["max_entropy"] else float("nan"),
             "fraction_sorted": sorted(layer["fraction"], reverse=True)}
            for _, r in runs.iterrows() if r["routed"] and r["status"] == "complete" for layer in r["router"]]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ figures
def plot_state(points: pd.DataFrame, sweep: str):
    """Accuracy (mean over seeds at the best lr, std as error bars) against total state (top row) and
    active state (bottom row), one column per training data; MoM as circles, single memories as squares."""
    from matplotlib.figure import Figure

    from mom_bench.report.figures import _colors, _floats, _log_x

    p = points[(points["sweep"] == sweep) & (points["status"] == "complete") & points["total"].notna()]
    trains = sorted(p["train"].unique())
    colors = _colors(p["series"])
    fig = Figure(figsize=(4.6 * len(trains) + 3.5, 7.2), layout="constrained")
    axes = fig.subplots(2, len(trains), squeeze=False, sharey=True)
    for c, train in enumerate(trains):
        for r, basis in enumerate(BASES):
            ax = axes[r][c]
            for series, g in p[p["train"] == train].groupby("series"):
                g = g.sort_values(basis)
                ax.errorbar(_floats(g[basis]), _floats(g["mean"]), yerr=_floats(g["mean_std"].fillna(0)),
                            marker="o" if g["routed"].iloc[0] else "s", capsize=3, color=colors[series],
                            label=series)
            _log_x(ax)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3, which="both")
            ax.set_xlabel(f"{basis} recurrent state (values)")
            ax.set_title(f"train {train}")
        axes[0][c].set_ylabel("mean accuracy")
        axes[1][c].set_ylabel("mean accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small")
    fig.suptitle(f"{sweep}: accuracy against total (top) and active (bottom) state; std over seeds")
    return fig


def plot_pairs(pairs: pd.DataFrame, sweep: str, metric: str = "mean"):
    """MoM minus its single memory of equal total (left) and active (right) state, per pair: each seed a
    dot, the mean with the std as a bar; the wins over seeds written beside it."""
    from matplotlib.figure import Figure

    p = pairs[(pairs["sweep"] == sweep) & (pairs["metric"] == metric)]
    height = max(2.5, 0.35 * p.groupby("basis").size().max() + 1.2)
    fig = Figure(figsize=(12, height), layout="constrained")
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, basis in zip(axes, BASES):
        g = p[p["basis"] == basis].reset_index(drop=True)
        for y, row in g.iterrows():
            diffs = [float(d) for d in row["diffs"].split()]
            ax.plot(diffs, [y] * len(diffs), linestyle="none", marker=".", color="0.5")
            ax.errorbar([row["mean_diff"]], [y], xerr=[0 if pd.isna(row["std_diff"]) else row["std_diff"]],
                        marker="o", capsize=3, color="C0")
            ax.annotate(f"{row['wins']}/{row['seeds']}", (1.0, y), xycoords=("axes fraction", "data"),
                        xytext=(4, 0), textcoords="offset points", va="center", fontsize="small")
        ax.set_yticks(range(len(g)), [f"{r.train} {r.kind} {r.state}" for r in g.itertuples()], fontsize="small")
        ax.axvline(0, color="0.3", linewidth=1)
        ax.invert_yaxis()
        ax.set_xlabel(f"MoM - one memory ({metric} accuracy)")
        ax.set_title(f"equal {basis} state (MoM wins / seeds at right)")
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(sweep)
    return fig


def plot_router(router: pd.DataFrame, sweep: str):
    """Left: the fraction of routed assignments per memory, sorted from the most used, mean and std over
    seeds and layers, beside the uniform router's 1 / E. Right: the router entropy over its maximum log E."""
    from matplotlib.figure import Figure

    from mom_bench.report.figures import _colors

    r = router[router["sweep"] == sweep]
    names = sorted({(s, t) for s, t in zip(r["model"], r["train"])})
    colors = _colors([s for s, _ in names])
    fig = Figure(figsize=(12, max(3.5, 0.3 * len(names) + 1.5)), layout="constrained")
    left, right = fig.subplots(1, 2)
    for y, (series, train) in enumerate(names):
        g = r[(r["model"] == series) & (r["train"] == train)]
        shares = pd.DataFrame(list(g["fraction_sorted"]))
        ranks = range(1, shares.shape[1] + 1)
        left.errorbar(ranks, shares.mean(), yerr=shares.std(ddof=1).fillna(0), marker="o", capsize=3,
                      color=colors[series], label=f"{series} [{train}]")
        left.plot(ranks, [1 / shares.shape[1]] * shares.shape[1], linestyle=":", color=colors[series])
        ratio = g["entropy_ratio"]
        right.errorbar([ratio.mean()], [y], xerr=[0 if len(ratio) < 2 else ratio.std(ddof=1)], marker="o",
                       capsize=3, color=colors[series])
    left.xaxis.get_major_locator().set_params(integer=True)
    left.set_xlabel("memory, from the most used")
    left.set_ylabel("fraction of routed assignments")
    left.set_title("load per memory (dotted: uniform)")
    left.grid(alpha=0.3)
    right.set_yticks(range(len(names)), [f"{s} [{t}]" for s, t in names], fontsize="small")
    right.invert_yaxis()
    right.set_xlim(0, 1.02)
    right.set_xlabel("router entropy / log E")
    right.set_title("router entropy (mean over tokens)")
    right.grid(alpha=0.3, axis="x")
    fig.suptitle(f"{sweep}: router statistics on the test set, best epoch")
    return fig


# ------------------------------------------------------------------------------------------- output
def _pm(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:.3f} ± {std:.3f}" if pd.notna(std) else f"{mean:.3f}"


def markdown(points: pd.DataFrame, pairs: pd.DataFrame, router: pd.DataFrame) -> str:
    lines = ["# The MoM study", "", "Per point the best lr (the mean over seeds is highest) and the mean ± "
             "std over its seeds; per matched pair the seeds on which MoM is more accurate than one memory "
             "of its total or active state (paired by seed, each at its best lr) and the mean ± std of the "
             "difference. States are in values (fp32: 4 bytes each), summed over layers.", ""]
    for sweep in sorted(points["sweep"].unique()):
        p = points[points["sweep"] == sweep]
        shown = pd.DataFrame({"train": p["train"], "model": p["model"], "d_model": p["d_model"].map(str),
                              "lr": p["lr"].map(lambda v: "-" if pd.isna(v) else f"{v:g}"),
                              "seeds": p["n_seeds"].map(str), "status": p["status"],
                              "mean": [_pm(m, s) for m, s in zip(p["mean"], p["mean_std"])],
                              "total state": p["total"].map(str), "active state": p["active"].map(str),
                              "params": p["params"].map(str)})
        lines += [f"## {sweep}", "", shown.to_markdown(index=False, disable_numparse=True), ""]
        q = pairs[pairs["sweep"] == sweep] if len(pairs) else pairs
        if len(q):
            shown = pd.DataFrame({"train": q["train"], "basis": q["basis"], "state": q["state"].map(str),
                                  "MoM": q["mom"], "one memory": q["single"], "metric": q["metric"],
                                  "MoM wins": [f"{w}/{n}" for w, n in zip(q["wins"], q["seeds"])],
                                  "MoM - one": [_pm(m, s) for m, s in zip(q["mean_diff"], q["std_diff"])]})
            lines += ["Matched pairs:", "", shown.to_markdown(index=False, disable_numparse=True), ""]
        r = router[router["sweep"] == sweep] if len(router) else router
        if len(r):
            g = r.groupby(["train", "model"])
            shown = pd.DataFrame({"runs x layers": g.size().map(str),
                                  "entropy / log E": [_pm(m, s) for m, s in zip(g["entropy_ratio"].mean(),
                                                                                 g["entropy_ratio"].std(ddof=1))],
                                  "most used memory's fraction": [
                                      _pm(m, s) for m, s in zip(g["fraction_sorted"].apply(lambda f: f.map(max).mean()),
                                                                g["fraction_sorted"].apply(lambda f: f.map(max).std(ddof=1)))]})
            lines += ["Router statistics:", "", shown.reset_index().to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(lines)


def write_study(res, out: Path) -> List[Path]:
    """`<out>/mom_study/`: points.csv, pairs.csv, router.csv, mom_study.md and figures/*.png|svg, when the
    records hold matched pairs or router statistics; nothing otherwise. Returns the written paths."""
    runs = study_runs(res) if len(res.runs) else pd.DataFrame()
    if not len(runs):
        return []
    points = study_points(res, runs)
    pairs = paired(points, runs)
    router = router_table(runs)
    if not len(pairs) and not len(router):
        return []
    folder = out / "mom_study"
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in ("points.csv", "pairs.csv", "router.csv", "mom_study.md")]
    points.drop(columns=["total", "active"]).to_csv(paths[0], index=False)
    pairs.to_csv(paths[1], index=False)
    router.to_csv(paths[2], index=False)
    paths[3].write_text(markdown(points, pairs, router))
    figures = [(f"accuracy_vs_state_{s}", plot_state, points, s) for s in sorted(points["sweep"].unique())]
    figures += [(f"pairs_{s}", plot_pairs, pairs, s) for s in sorted(pairs["sweep"].unique())] if len(pairs) else []
    figures += [(f"router_{s}", plot_router, router, s) for s in sorted(router["sweep"].unique())] if len(router) else []
    for stem, plot, table, sweep in figures:
        fig = plot(table, sweep)
        for ext in ("png", "svg"):
            paths.append(folder / "figures" / f"{stem}.{ext}")
            fig.savefig(paths[-1], dpi=120)
    return paths

