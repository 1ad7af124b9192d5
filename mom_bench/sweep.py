"""What every mom_bench multirun does besides running its points (a Hydra callback, conf/config.yaml).

Hydra's basic sweeper runs the grid (`hydra.sweeper.params` and `a=1,2` overrides); this callback adds:

- before the first run, every point is composed and validated, and a sweep with bad points is refused
  with every bad point named (Hydra itself checks only that points compose);
- the results folders are checked writable, and the workers learn this process's pid, so that they end
  with it (mom_bench.claims) and can say "run k of N";
- at the end the table and the report are written from the records (mom_bench.summary), and the sweep
  exits with status 1, naming each point, when a point has no complete record;
- the launcher configs (conf/launcher/) ask `${mom_bench_gpus:N}` how many GPUs each job may take.

Hydra turns an exception raised in a callback into a warning, so refusal and failure are SystemExit with
the message: printed to stderr, exit status 1.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mom_bench import claims, records

log = logging.getLogger(__name__)

SIZE_ENV = "MOM_BENCH_SWEEP_SIZE"  # the number of points, for "run k of N" in the workers' logs


def gpus(at_most: Optional[int] = None) -> int:
    """`${mom_bench_gpus:N}`: the GPUs of this host, at most N, for the launchers to give each job. A job that
    asks for a GPU no machine has waits for one forever (Ray: "No available node types can fulfill ..."),
    so it is 0 on a host without one. Registered when this module is imported: Hydra instantiates the
    callback, and so imports it, before it instantiates the launcher, which resolves its config."""
    import torch

    count = torch.cuda.device_count()
    return count if at_most is None else min(count, at_most)


OmegaConf.register_new_resolver("mom_bench_gpus", gpus, replace=True)


def points(config: DictConfig) -> List[List[str]]:
    """The override list of every point of the sweep, as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    overrides = parser.parse_overrides(params + list(config.hydra.overrides.task))
    return [list(p) for batch in BasicSweeper.split_arguments(overrides, None) for p in batch]


def job_config(master: DictConfig, overrides: List[str]) -> DictConfig:
    """The config that the job of one point receives (without Hydra's own node)."""
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    cfg = GlobalHydra.instance().config_loader().load_sweep_config(master_config=master,
                                                                 sweep_overrides=list(overrides))
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _swept(grid: List[List[str]]) -> set:
    """The overrides that differ between points: enough to name a point."""
    return {o for o in {o for p in grid for o in p} if sum(o in p for p in grid) < len(grid)}


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.planned: List[Dict[str, Any]] = []  # per point: its overrides, run id and record path

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from mom_bench.config import ConfigError
        from mom_bench.train import load_config

        if config.hydra.sweeper.get("_target_", "").split(".")[-1] != "BasicSweeper":
            return  # another sweeper chooses its points as it goes: nothing to check ahead
        bad, self.planned = [], []
        grid = points(config)
        for overrides in grid:
            name = " ".join(o for o in overrides if o in _swept(grid)) or " ".join(overrides) or "(no overrides)"
            try:
                cfg, _ = load_config(job_config(config, overrides))
            except (ConfigError, HydraException, OmegaConfBaseException) as exc:
                bad.append(f"  {name}: {' '.join(str(exc).split())}")
                continue
            folder = os.path.abspath(cfg["results_dir"])
            rid = records.run_id(cfg)
            self.planned.append({"name": name, "results_dir": folder, "run_id": rid,
                                 "path": records.record_path(folder, rid)})
        if bad:
            raise SystemExit(f"invalid config: {len(bad)} of {len(grid)} sweep points are invalid, nothing "
                             "was run:\n" + "\n".join(bad))
        try:
            for folder in sorted({p["results_dir"] for p in self.planned}):
                records.check_writable(folder)
        except records.RecordError as exc:
            raise SystemExit(str(exc)) from None
        os.environ[claims.PARENT_ENV] = f"{socket.gethostname()}:{os.getpid()}"
        os.environ[SIZE_ENV] = str(len(grid))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from mom_bench.summary import summarize

        if not self.planned:
            return
        incomplete = []
        for p in self.planned:
            rec = records.load_record(p["path"])
            if rec is None:
                held = claims.holder(p["path"]) if p["path"].with_suffix(".lock").exists() else None
                why = f"being trained by another process ({held})" if held else "no record (the job did not end)"
                incomplete.append(f"  {p['name']}: {why}")
            elif rec["status"] != "complete":
                reason = " ".join(str(rec.get("reason")).split())[:300]
                incomplete.append(f"  {p['name']}: {rec['status']}: {reason} ({p['run_id']})")
        unwritten = []
        for folder in sorted({p["results_dir"] for p in self.planned}):
            try:
                md = summarize(folder)
                log.info("summary written to %s, report in %s", md, md.parent / "report")
            except Exception as exc:  # noqa: BLE001 -- a failure of the sweep, said below
                unwritten.append(f"  the summary of {folder}: {type(exc).__name__}: {exc}")
        n = len(self.planned)
        log.info("sweep: %d of %d points complete", n - len(incomplete), n)
        if incomplete or unwritten:
            raise SystemExit(f"sweep: {n - len(incomplete)} of {n} points complete; not done (the table and "
                             "report show what there is):\n" + "\n".join(incomplete + unwritten))
