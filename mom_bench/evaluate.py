"""`python -m mom_bench eval`: lm-eval tasks on a checkpoint; the scores become an "eval" run record.

Defaults: the `jrt_recall` group (FDA, SWDE, SQuAD under the JRT protocol) from the installed
`mom_bench/tasks/recall` folder. The record lands in `<results_dir>/runs/<run_id>.json` in the shape that
`mom_bench.report` reads (`kind: eval`, `model.label`, `model.d_model`, `scores: {task: value}`), so
`python -m mom_bench report <results_dir>` draws the scores beside the MQAR results.

Task metadata (`metadata.*`, e.g. `+metadata.recall_data=/data/recall`) goes to every task; the
checkpoint's tokenizer is added as `tokenizer` unless given, since the recall tasks measure their window
with it. An evaluation is always run again (no skipping): a checkpoint folder can hold new weights.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from mom_bench import records, runtime
from mom_bench.config import EvalConfig, merge_checked, validate_eval

log = logging.getLogger(__name__)

RECALL_TASKS = "mom_bench.tasks.recall"


def recall_task_dir() -> str:
    """The installed recall task folder (lm-eval's include_path needs a real folder on disk)."""
    return str(importlib.resources.files(RECALL_TASKS))


def primary_scores(results: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Per task (groups left out): its first configured metric, with its name and filter."""
    scores = {}
    for task, config in (results.get("configs") or {}).items():
        metrics = results.get("results", {}).get(task, {})
        wanted = [m["metric"] for m in config.get("metric_list") or [] if isinstance(m.get("metric"), str)]
        keys = [k for k in metrics if "," in k and "_stderr" not in k and isinstance(metrics[k], (int, float))]
        key = next((k for w in wanted for k in keys if k.split(",")[0] == w), keys[0] if keys else None)
        if key is not None:
            scores[task] = {"value": float(metrics[key]), "metric": key,
                            "stderr": metrics.get(key.replace(",", "_stderr,", 1))}
    return scores


def _run_id(label: str, d_model: int, identity: Dict[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"eval_{label.replace('+', '-')}_d{d_model}_{digest}"


def evaluate(cfg: Any) -> Dict[str, Any]:
    """Evaluate as configured (an EvalConfig, dict or DictConfig); write and return the run record."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mom_bench.lm_eval_model import MomBenchLM

    merged = merge_checked(EvalConfig, cfg)
    config = OmegaConf.to_container(merged, resolve=True)
    cfg = OmegaConf.to_object(merged)
    validate_eval(cfg)

    # Loading errors (a missing or corrupt checkpoint) raise: there is nothing to record yet.
    lm = MomBenchLM(checkpoint=cfg.checkpoint, device=cfg.device, batch_size=cfg.batch_size, dtype=cfg.dtype,
                    max_length=cfg.max_length, max_gen_toks=cfg.max_gen_toks)
    model_cfg = _checkpoint_model_config(lm.checkpoint_path)
    label = records.model_label(model_cfg)
    metadata = {"tokenizer": lm.tok.name, **cfg.metadata}
    include_path = cfg.include_path or recall_task_dir()
    identity = {"checkpoint": lm.checkpoint_path, "tasks": cfg.tasks, "limit": cfg.limit, "metadata": metadata,
                "num_fewshot": cfg.num_fewshot, "max_length": cfg.max_length, "include_path": include_path}
    rid = _run_id(label, model_cfg["d_model"], identity)
    record: Dict[str, Any] = {
        "kind": "eval", "run_id": rid, "status": "failed", "reason": None,
        "config": {"model": model_cfg, "eval": config}, "checkpoint": lm.checkpoint_path,
        "model": records.model_summary(lm.model, model_cfg, cfg.max_length),
        "tokenizer": lm.tok.name, "tasks": list(cfg.tasks), "metadata": metadata,
        "hardware": runtime.hardware(lm.device.type), "lm_eval_version": runtime.version("lm_eval"),
        "started_at": records.now(),
    }
    start = time.perf_counter()
    path = records.record_path(cfg.results_dir, rid)
    try:
        task_manager = TaskManager(include_path=include_path, include_defaults=cfg.include_defaults,
                                   metadata=metadata)
        results = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), task_manager=task_manager,
                                          limit=cfg.limit, num_fewshot=cfg.num_fewshot,
                                          log_samples=cfg.log_samples, random_seed=cfg.seed,
                                          numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                                          fewshot_random_seed=cfg.seed)
        scores = primary_scores(results)
        if not scores:
            raise RuntimeError(f"lm-eval returned no task scores for tasks {cfg.tasks}")
        record.update(status="complete", scores={t: s["value"] for t, s in scores.items()},
                      metrics={t: s for t, s in scores.items()},
                      results=json.loads(json.dumps(results.get("results", {}), default=str)),
                      n_samples=results.get("n-samples"))
        if cfg.log_samples:
            samples = Path(cfg.results_dir) / "samples" / f"{rid}.json"
            records.write_record(samples, json.loads(json.dumps(results.get("samples", {}), default=str)))
            record["samples"] = str(samples)
    except BaseException as exc:
        record["reason"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()[-3000:]
        raise
    finally:
        record["wall_time_s"] = round(time.perf_counter() - start, 3)
        record["ended_at"] = records.now()
        records.write_record(path, record)
        log.info("eval record: %s", path)
    for task, value in record["scores"].items():
        log.info("%s: %.4f", task, value)
    return record


def _checkpoint_model_config(path: Optional[str]) -> Dict[str, Any]:
    from mom_bench.checkpoint import read_config

    return dict(read_config(path)["model"])
