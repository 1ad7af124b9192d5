"""Sweep summary: the report of a sweep's results folder, plus table.csv, table.md and accuracy.png beside
its records for a quick look.

Everything is built by `mom_bench.report` (one table-building path): the full report goes to
`<results_dir>/report/` (tables in CSV, Markdown and LaTeX, PNG and SVG figures, an executed notebook and
its HTML export); its table.csv and table.md and its accuracy-against-d_model figure are copied up into
`<results_dir>`. The table keeps, per (model, d_model, train slices), the learning rate with the best mean
test accuracy, as the Zoology and Based papers report; failed runs stay visible (see mom_bench.report).
"""
from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any, List

from hydra.experimental.callback import Callback

from mom_bench import report

log = logging.getLogger(__name__)


def summarize(results_dir: str | Path, execute: bool = True, raise_notebook_errors: bool = True) -> Path:
    """Write `<results_dir>/report/` and the table.csv, table.md and accuracy.png copies; return the path
    of table.md. Raises report.NoRecords (a FileNotFoundError) when there is no run record."""
    results_dir = Path(results_dir)
    out = results_dir / "report"
    try:
        report.write_report(results_dir, out, execute=execute, raise_notebook_errors=raise_notebook_errors)
    finally:  # the tables and figures are written before the notebook runs: copy them even if it failed
        for name in ("table.csv", "table.md"):
            if (out / name).exists():
                shutil.copyfile(out / name, results_dir / name)
        figures = sorted((out / "figures").glob("accuracy_vs_d_model_*.png"))
        if figures:
            shutil.copyfile(figures[0], results_dir / "accuracy.png")
    return results_dir / "table.md"


class SummaryCallback(Callback):
    """Hydra callback (see conf/sweep/*.yaml): report on the sweep's results_dir once all jobs returned."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        from hydra.utils import to_absolute_path

        md = summarize(to_absolute_path(config.results_dir), raise_notebook_errors=False)
        log.info("summary written to %s, report in %s", md, md.parent / "report")


def main(argv: List[str]) -> int:
    """`python -m mom_bench table <results_dir>`: re-summarize a finished (or partial) sweep."""
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m mom_bench table <results_dir>", file=sys.stderr)
        return 2
    try:
        md = summarize(argv[0])
    except report.NoRecords as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(md.read_text())
    return 0
