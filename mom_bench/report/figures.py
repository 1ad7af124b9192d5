"""The report's figures: each a function of one of `Results`' tables, returning a matplotlib Figure, and
registered with the table it draws (`FIGURES`)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pandas as pd

from .frames import Results, SLICE, _train_order, slice_columns


def _floats(values: pd.Series):
    """A numeric column as a float numpy array (NaN where missing), for matplotlib."""
    return pd.to_numeric(values, errors="coerce").astype("Float64").to_numpy(dtype=float, na_value=float("nan"))


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
    function: Callable
    table: str
    kwargs: Dict[str, Any]

    def call(self) -> str:
        """The notebook's code for it (the figure functions are mom_bench.report's)."""
        args = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"report.{self.function.__name__}(res.{self.table}{args})"

    def draw(self, res: Results):
        return self.function(getattr(res, self.table), **self.kwargs)

    def caption(self) -> str:
        """The first paragraph of the figure function's docstring, as one line."""
        return " ".join(self.function.__doc__.split("\n\n")[0].split())


def figure_specs(res: Results) -> List[FigureSpec]:
    """The figures whose data exist: per sweep accuracy-vs-width and accuracy-vs-state; throughput if there
    are benchmark records; task scores if there are eval records."""
    specs = []
    for sweep in sorted(res.best["sweep"].unique()) if len(res.runs) else []:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", sweep) or "runs"
        specs.append(FigureSpec(f"accuracy_vs_d_model_{slug}", plot_accuracy_vs_d_model, "best", {"sweep": sweep}))
        if res.best.loc[res.best["sweep"] == sweep, "state_total_bytes"].notna().any():
            specs.append(FigureSpec(f"accuracy_vs_state_{slug}", plot_accuracy_vs_state, "best", {"sweep": sweep}))
    if len(res.bench):
        specs.append(FigureSpec("throughput_vs_seq_len", plot_throughput, "bench", {}))
    if len(res.scores):
        specs.append(FigureSpec("task_scores", plot_task_scores, "scores", {}))
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
