"""The report notebook: rebuilds the tables and draws every figure with this package, executed headless."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List

from .figures import figure_specs
from .frames import Results

log = logging.getLogger(__name__)


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
