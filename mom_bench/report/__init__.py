"""Reports: every record under a results root becomes tables, figures and an executed notebook.

The package: `frames` reads the records into tables (`load` -> `Results`), `tables` writes them as CSV,
Markdown and LaTeX, `figures` draws them (each figure a function of one table, listed by `figure_specs`),
`notebook` builds and executes the notebook; here, `write_report` puts a whole report in place and `main`
is the command line.

`python -m mom_bench report <root> [--out DIR]` (default DIR: `<root>/report`) reads every `runs/*.json`
under `root`, at any depth, so one report can cover several sweeps, and writes

    runs.csv                       one row per MQAR training run (every column below)
    table.csv, table.md, table.tex best learning rate per (sweep, model, d_model, train), over seeds
    figures/*.png, figures/*.svg   the figures listed by `figure_specs`
    report.ipynb, report.html      a notebook that rebuilds the tables and draws every figure with this
                                   package, executed headless (nbclient) and exported (nbconvert)
    mom_study/                     where MoM runs have single-memory partners of equal state or router
                                   statistics: the study's points, pairs, router tables and figures
                                   (mom_bench.study)

The notebook is executed with nbclient and ipykernel and exported with nbconvert; without them it is written
unexecuted (with a warning) and tables and figures are unaffected. `--no-execute` skips the execution.

Records: their kinds and fields are documented in mom_bench.records, which reads and checks them; MQAR
runs become `runs` and `best`, bench timings `bench`, eval scores `scores`.

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

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from mom_bench import files

from .figures import (FigureSpec, figure_specs, plot_accuracy_vs_d_model, plot_accuracy_vs_state,  # noqa: F401
                      plot_task_scores, plot_throughput, write_figures)
from .frames import (KEY, NoRecords, Results, best_table, bench_frame, load, runs_frame,  # noqa: F401
                     scores_frame, slice_columns)
from .notebook import notebook, write_notebook  # noqa: F401
from .tables import latex, markdown, shown_table, write_tables  # noqa: F401

log = logging.getLogger(__name__)


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
        from mom_bench.study import write_study  # here: mom_bench.study imports this package

        written += write_study(res, tmp)  # mom_study/, where the records hold MoM pairs or router statistics
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
