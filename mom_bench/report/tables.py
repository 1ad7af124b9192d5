"""The best table as text: Markdown, LaTeX and the CSV files of a report."""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import pandas as pd

from .frames import Results, slice_columns


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
    # Zoology's state count (every layer, a hybrid's convolution included) beside ours (one layer of the
    # model's own mixer), where the two differ in kind: in sweeps with hybrids (labels such as base_conv+gla)
    if "state_mixer_bytes" in b and b["model"].astype(str).str.contains(r"\+").any():
        out.insert(out.columns.get_loc("state bytes") + 1, "mixer bytes",
                   b["state_mixer_bytes"].map(lambda v: num(v, "{:.0f}".format)).to_numpy())
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
             "± the sample standard deviation where several seeds exist. Each sweep says whose accuracy it "
             "shows: the best epoch's (this project's default) or the last epoch's (Zoology's protocol; the "
             "sweep sets `reported_epoch`). `state bytes` sums every layer's state, a hybrid's convolution "
             "layer included (Zoology's count); `mixer bytes`, shown beside it for hybrids, is one layer of "
             "the model's own mixer. `failed` counts failed runs of all learning rates.", ""]
    for sweep in sorted(res.best["sweep"].unique()) if len(runs) else []:
        epochs = sorted(set(res.best.loc[res.best["sweep"] == sweep, "epoch"].dropna()))
        shows = f" Accuracy at the {' and '.join(epochs)} epoch." if epochs else ""
        lines += [f"## {sweep}", "", f"{_count(runs[runs['sweep'] == sweep])}.{shows}", "",
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
        epochs = sorted(set(res.best.loc[res.best["sweep"] == sweep, "epoch"].dropna()))
        caption = _latex_escape(f"{sweep}: best learning rate per (model, d_model, train); mean over seeds; "
                                f"accuracy at the {' and '.join(epochs) or 'best'} epoch")
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
