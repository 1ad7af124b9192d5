"""Command line: `python -m mom_bench {train,sweep,table,report,bench,pretrain,eval} ...`.

`train`, `sweep`, `pretrain` and `eval` are one Hydra app each over their primary config in conf/; scaling
out is Hydra's job (multirun with a launcher plugin: conf/launcher/; mom_bench.sweep checks and
summarizes), so there is no scheduler here. `sweep` only adds `sweep=default` when no sweep file is
named; the sweep files switch Hydra to multirun themselves.
"""
from __future__ import annotations

import logging
import sys
from typing import List, Optional

log = logging.getLogger("mom_bench")

USAGE = """usage: python -m mom_bench <command> [arguments]

commands:
  train [overrides]     one MQAR training run, e.g. train model=mom model.d_model=128 optim.lr=3e-3
  sweep [overrides]     a Hydra multirun of a sweep file (default: sweep=default), e.g.
                        sweep sweep=zoology_fig2_reduced launcher=parallel hydra.launcher.n_jobs=4
  table <results_dir>   rewrite table.csv, table.md and accuracy.png (and <results_dir>/report/)
  report <root> [--out DIR] [--no-execute]
                        tables (CSV, Markdown, LaTeX), figures (PNG, SVG) and an executed notebook
                        from every run record under <root>, into DIR (default: <root>/report)
  bench [--suite kernel,layer,decode,generate] [--quick] [--out DIR]
                        time our Triton core and layers against flash-linear-attention and SDPA
                        side by side on one GPU; prints a table of times and ratios
  pretrain [overrides]  language-model pretraining on a hub dataset or local text, resumable, also under
                        torchrun, e.g. pretrain model=mom data.files='corpus/*.txt' optim.max_steps=2000
  eval [overrides]      lm-eval tasks (default: the jrt_recall group) on a checkpoint, into an eval record,
                        e.g. eval checkpoint=outputs/pretrain +metadata.recall_data=/data/recall limit=100

`python -m mom_bench train --help` lists the config groups and their options (Hydra's help).
Runs write <results_dir>/runs/<run_id>.json; a run with a complete record is skipped.
Exit status: 0 when everything asked for is done (every point of a sweep has a complete record), 1 when
something failed (the sweep's table and report still show what there is), 2 for a usage error, 130 when
interrupted.
"""


class _Stop(Exception):
    """The command cannot go on for a reason the message gives in full (printed without a traceback)."""


def _train(cfg) -> dict:
    """The task of `train` and of every sweep point: one run. A single run that did not complete is an
    error (exit status 1); in a sweep it is a result, which mom_bench.sweep reports at the end."""
    import os

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from hydra.utils import to_absolute_path

    from mom_bench.sweep import SIZE_ENV
    from mom_bench.train import train

    hc = HydraConfig.get()
    cfg.results_dir = to_absolute_path(cfg.results_dir)  # stable for every worker and the summary
    sweep = hc.mode == RunMode.MULTIRUN
    if sweep and os.environ.get(SIZE_ENV):
        log.info("run %d of %s: %s", hc.job.num + 1, os.environ[SIZE_ENV], " ".join(hc.overrides.task))
    if sweep:  # a job that raises would stop Hydra's sweeper before the summary: log it, go on
        try:
            return train(cfg)
        except Exception as exc:  # noqa: BLE001 -- the summary lists the point as not done
            log.exception("this point failed before it had a record: %s", exc)
            return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    record = train(cfg)
    if record["status"] != "complete":
        raise _Stop(f"run {record['run_id']} {record['status']}: {record['reason']}")
    return record


def _pretrain(cfg) -> None:
    from mom_bench.pretrain import pretrain

    pretrain(cfg)


def _eval(cfg) -> None:
    from mom_bench.evaluate import evaluate

    evaluate(cfg)


# command: (its primary config in conf/, its task)
HYDRA_COMMANDS = {"train": ("config", _train), "sweep": ("config", _train),
                  "pretrain": ("pretrain", _pretrain), "eval": ("eval", _eval)}


def _hydra(command: str, argv: List[str]) -> int:
    """Run a Hydra app over conf/<its config>.yaml; errors the user can fix are printed without a
    traceback, Ctrl-C ends it quietly (exit status 130)."""
    import os
    import time

    import hydra
    from hydra.errors import CompactHydraException
    from omegaconf import DictConfig

    from mom_bench.checkpoint import CheckpointError
    from mom_bench.config import ConfigError, register_configs
    from mom_bench.records import RecordError

    class Stop(CompactHydraException):
        """Hydra prints a CompactHydraException as its message alone, without a traceback."""

    config_name, task = HYDRA_COMMANDS[command]
    register_configs()
    # Names this invocation's Hydra log folder (conf/*.yaml): two commands started in the same second on
    # one results folder must not write into one log folder.
    os.environ["MOM_BENCH_INVOCATION"] = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}"

    # pkg:// finds the YAML inside the installed package, so the app works from any directory.
    @hydra.main(version_base="1.3", config_path="pkg://mom_bench.conf", config_name=config_name)
    def app(cfg: DictConfig):
        try:
            return task(cfg)
        except ConfigError as exc:
            raise Stop(f"invalid config: {exc}") from None
        except (CheckpointError, RecordError, _Stop) as exc:
            raise Stop(str(exc)) from None

    sys.argv = [f"mom_bench {command}"] + argv
    try:
        app()
    except KeyboardInterrupt:
        print(f"mom_bench {command}: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "table":
        from mom_bench.summary import main as table

        return table(rest)
    if command == "report":
        from mom_bench.report import main as report

        return report(rest)
    if command == "bench":
        from mom_bench.bench import main as bench

        return bench(rest)
    if command not in HYDRA_COMMANDS:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if command == "sweep" and not any(a.split("=")[0].lstrip("+~") == "sweep" for a in rest):
        rest = ["sweep=default"] + rest
    missing = _missing_launcher(rest)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    return _hydra(command, rest)


# conf/launcher/<name>.yaml -> (the Hydra plugin package it needs, the extra that installs it)
LAUNCHER_PLUGINS = {"slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
                    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
                    "ray": ("hydra_plugins.hydra_ray_launcher", "ray")}


def _missing_launcher(argv: List[str]) -> Optional[str]:
    """Without its plugin a launcher fails deep in Hydra ("Could not find 'hydra/launcher/submitit_slurm'"),
    which does not say what to install: name the extra instead."""
    import importlib.util

    for arg in argv:
        key, _, name = arg.partition("=")
        if key.lstrip("+~") == "launcher" and name in LAUNCHER_PLUGINS:
            module, extra = LAUNCHER_PLUGINS[name]
            if importlib.util.find_spec(module) is None:
                return (f"launcher={name} needs the {extra!r} extra, which is not installed: "
                        f"pip install -e \".[{extra}]\" (or pip install \"mom_bench[{extra}]\")")
    return None


if __name__ == "__main__":
    sys.exit(main())
