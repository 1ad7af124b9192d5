"""Sweep summary: the report of a sweep's results folder, plus table.csv, table.md and accuracy.png beside
its records for a quick look.

Everything is built by `mom_bench.report` (one table-building path): the full report goes to
`<results_dir>/report/` (tables in CSV, Markdown and LaTeX, PNG and SVG figures, an executed notebook and
its HTML export); its table.csv and table.md and its accuracy-against-d_model figure are copied up into
`<results_dir>`. The table keeps, per (model, d_model, train slices), the learning rate with the best mean
test accuracy, as the Zoology and Based papers report; failed runs stay visible (see mom_bench.report).
Every sweep ends here (mom_bench.sweep); `python -m mom_bench table` runs it again.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List

from mom_bench import files, report


def summarize(results_dir: str | Path, execute: bool = True) -> Path:
    """Write `<results_dir>/report/` and the table.csv, table.md and accuracy.png copies; return the path
    of table.md. Raises report.NoRecords (a FileNotFoundError) when there is no run record, and
    report.ReportError when the notebook failed (after the tables, figures and copies are written)."""
    results_dir = Path(results_dir)
    out = results_dir / "report"
    try:
        report.write_report(results_dir, out, execute=execute)
    finally:  # a notebook that failed leaves good tables and figures: copy them up all the same
        for name in ("table.csv", "table.md"):
            if (out / name).exists():
                files.copy(out / name, results_dir / name)
        figures = sorted((out / "figures").glob("accuracy_vs_d_model_*.png"))
        if figures:
            files.copy(figures[0], results_dir / "accuracy.png")
    return results_dir / "table.md"


def main(argv: List[str]) -> int:
    """`python -m mom_bench table <results_dir>`: re-summarize a finished (or partial) sweep."""
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m mom_bench table <results_dir>", file=sys.stderr)
        return 2
    try:
        md = summarize(argv[0])
    except (report.NoRecords, report.ReportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(md.read_text())
    return 0
