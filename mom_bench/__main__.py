"""Command line: `python -m mom_bench {train,sweep,table,report,bench,pretrain,eval} ...`.

`train` and `sweep` hand their arguments to one Hydra app; scaling out is Hydra's job (multirun with a
launcher plugin: conf/launcher/), so there is no scheduler here. `sweep` only adds `sweep=default` when
no sweep file is named; the sweep files switch Hydra to multirun themselves.
"""
from __future__ import annotations

import sys
from typing import List, Optional

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
"""


def _hydra_app(prog: str, argv: List[str]) -> None:
    import hydra
    from hydra.errors import CompactHydraException
    from omegaconf import DictConfig

    from mom_bench.config import ConfigError, register_configs

    class InvalidConfig(CompactHydraException):
        """Hydra prints a CompactHydraException as its message alone, without a traceback."""

    register_configs()

    # pkg:// finds the YAML inside the installed package, so the app works from any directory.
    @hydra.main(version_base="1.3", config_path="pkg://mom_bench.conf", config_name="config")
    def app(cfg: DictConfig) -> None:
        from hydra.utils import to_absolute_path

        from mom_bench.train import train

        cfg.results_dir = to_absolute_path(cfg.results_dir)  # stable for every worker and the summary
        try:
            train(cfg)
        except ConfigError as exc:
            raise InvalidConfig(f"invalid config: {exc}") from None

    sys.argv = [prog] + argv
    app()


def _hydra_command(prog: str, argv: List[str], config_name: str, target: str) -> None:
    """A Hydra app over conf/<config_name>.yaml calling `module:function`(cfg) (pretrain and eval)."""
    import importlib

    import hydra
    from hydra.errors import CompactHydraException
    from omegaconf import DictConfig

    from mom_bench.checkpoint import CheckpointError
    from mom_bench.config import ConfigError, register_configs

    class InvalidConfig(CompactHydraException):
        """Printed as its message alone, without a traceback."""

    register_configs()

    @hydra.main(version_base="1.3", config_path="pkg://mom_bench.conf", config_name=config_name)
    def app(cfg: DictConfig) -> None:
        module, function = target.split(":")
        try:
            getattr(importlib.import_module(module), function)(cfg)
        except ConfigError as exc:
            raise InvalidConfig(f"invalid config: {exc}") from None
        except CheckpointError as exc:
            raise InvalidConfig(str(exc)) from None

    sys.argv = [prog] + argv
    app()


HYDRA_COMMANDS = {"pretrain": ("pretrain", "mom_bench.pretrain:pretrain"),
                  "eval": ("eval", "mom_bench.evaluate:evaluate")}


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
    if command in HYDRA_COMMANDS:
        _hydra_command(f"mom_bench {command}", rest, *HYDRA_COMMANDS[command])
        return 0
    if command not in ("train", "sweep"):
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if command == "sweep" and not any(a.split("=")[0].lstrip("+~") == "sweep" for a in rest):
        rest = ["sweep=default"] + rest
    _hydra_app(f"mom_bench {command}", rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
