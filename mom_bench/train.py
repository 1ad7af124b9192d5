"""One MQAR training run: ``train(cfg) -> record``.

The Zoology protocol (mqar.md): AdamW, cosine schedule to 0, evaluation on every test slice after each
epoch, early stop once the mean accuracy exceeds ``optim.early_stop``. A run never raises for a training
failure: a non-finite loss, an out-of-memory error or a bug in a mixer is written into the run's record as
``failed`` so that the other points of a sweep still run. Only an invalid config (ConfigError) or a results
folder that cannot be written (records.RecordError) raises, before any work.
"""
from __future__ import annotations

import logging
import math
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from mom_bench import claims, records, runtime
from mom_bench.config import ConfigError, RunConfig, merge_checked, validate
from mom_bench.graphs import Replay

log = logging.getLogger(__name__)

LOSS_POINTS = 200  # the loss curve keeps about this many (step, loss) points, whatever the run length


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the message says at which step."""


def train(cfg: Any) -> Dict[str, Any]:
    """Run one training run unless a complete record of it exists; return its record.

    `cfg` is a RunConfig, or a dict or DictConfig (Hydra's), which is type-checked against RunConfig. A run
    that another process is training (its claim is live, mom_bench.claims) is not started: the returned
    record has status "running" and is not written."""
    config, cfg = load_config(cfg)
    rid = records.run_id(config)
    records.check_writable(cfg.results_dir)
    path = records.record_path(cfg.results_dir, rid)
    claim = claims.claim(path)
    if claim is None:
        holder = claims.holder(path)
        log.warning("skip %s: another process is training it (%s)", rid, holder)
        return {"run_id": rid, "status": "running", "reason": f"claimed by {holder}", "config": config}
    with claim:
        if records.is_complete(path):
            log.info("skip %s: complete record exists at %s", rid, path)
            return records.load_record(path)
        record = _attempt(cfg, config, rid)
        _write(path, record)
    return record


def load_config(cfg: Any) -> Tuple[Dict[str, Any], RunConfig]:
    """(resolved config as a dict, RunConfig) of a RunConfig, dict or DictConfig, checked: unknown keys
    (`+optim.learning_rate=...`) and invalid values raise ConfigError."""
    merged = merge_checked(RunConfig, cfg)
    config = OmegaConf.to_container(merged, resolve=True)
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return config, cfg


def _attempt(cfg: RunConfig, config: Dict[str, Any], rid: str) -> Dict[str, Any]:
    """The record of one training attempt: complete, or failed with the reason."""
    record: Dict[str, Any] = {"kind": "mqar", "run_id": rid, "status": "failed", "reason": None,
                              "config": config, "started_at": records.now()}
    start = time.perf_counter()
    try:
        _run(cfg, record)
        record["status"] = "complete"
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any failure of one run is recorded, the sweep goes on
        record["reason"] = str(exc) if isinstance(exc, NonFiniteLoss) else f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()[-3000:]
        log.error("%s failed: %s", rid, record["reason"])
    record["wall_time_s"] = round(time.perf_counter() - start, 3)
    record["ended_at"] = records.now()
    if record["status"] == "complete":
        log.info("%s: mean accuracy %.3f (best epoch %d; %d of %d epochs run), %.0f s", rid,
                 record["mean_accuracy"], record["best_epoch"], record["epochs_run"], cfg.optim.epochs,
                 record["wall_time_s"])
    return record


def _write(path, record: Dict[str, Any]) -> None:
    """Write the record; if its folder cannot take it any more (a full disk), write it to a fallback path
    and say where, so that the hours of training are not lost."""
    try:
        records.write_record(path, record)
    except OSError as exc:
        fallback = records.fallback_path(record["run_id"])
        records.write_record(fallback, record)
        record["record_path"] = str(fallback)
        log.error("could not write %s (%s); the record is at %s", path, exc, fallback)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine from 1 to 0 over the remaining steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _batches(slices, batch_size: int, gen: torch.Generator, device: torch.device) -> List[tuple]:
    """(slice index, example indices on `device`) for one epoch: each batch comes from one slice, because
    slices can have different lengths; the order of batches across slices is shuffled. Each slice's
    permutation goes to the device once per epoch (a copy per batch would wait for the GPU each time)."""
    out = []
    for i, s in enumerate(slices):
        perm = torch.randperm(len(s.inputs), generator=gen).to(device)
        out += [(i, perm[j:j + batch_size]) for j in range(0, len(perm), batch_size)]
    order = torch.randperm(len(out), generator=gen).tolist()
    return [out[k] for k in order]


def supervised(s, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A slice on `device` as (inputs, query positions, targets at those positions): the model computes
    logits only where the loss and the accuracy look."""
    from mom_bench.tasks.mqar import query_positions

    positions = query_positions(s.targets)
    return s.inputs.to(device), positions.to(device), s.targets.gather(1, positions).to(device)


def correct_counter(model, device: torch.device) -> Callable:
    """(inputs, positions, targets) -> the number of correct predictions, as a device tensor."""
    @torch.no_grad()
    def correct(x, positions, y):
        with runtime.autocast(device):
            logits, _ = model(x, positions)
        return (logits.argmax(-1) == y).sum()

    return correct


def evaluate(model, slices, batch_size: int, device: torch.device,
             correct: Optional[Callable] = None) -> Dict[str, float]:
    """Accuracy per test slice over its query positions; one host sync per slice. `correct` counts a
    batch's correct predictions (default: `correct_counter`; the training loop passes its graphed one)."""
    correct = correct or correct_counter(model, device)
    model.eval()
    result = {}
    for s in slices:
        inputs, positions, targets = supervised(s, device)
        hits = torch.zeros((), dtype=torch.long, device=device)
        for j in range(0, len(inputs), batch_size):
            hits += correct(inputs[j:j + batch_size], positions[j:j + batch_size], targets[j:j + batch_size])
        result[s.name] = int(hits) / max(targets.numel(), 1)
    model.train()
    return result


def optimizer(model, o, capturable: bool) -> torch.optim.AdamW:
    """AdamW as the Zoology protocol sets it; `capturable` (CUDA) keeps its step count and learning rate
    on the device, as a CUDA graph needs: the schedule then fills `param_groups[i]["lr"]` in place."""
    lr = torch.tensor(o.lr, device=next(model.parameters()).device) if capturable else o.lr
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                             capturable=capturable)


def train_step(model, opt, grad_clip: float, device: torch.device, graph: bool, name: str) -> Replay:
    """(inputs, query positions, targets) -> loss: one optimizer step (forward under autocast, the head at
    the query positions only, cross-entropy plus the auxiliary loss, backward, clipping, AdamW), replayed
    from a CUDA graph per batch shape when `graph`."""
    def step(x, positions, y):
        with runtime.autocast(device):
            logits, aux = model(x, positions)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) + aux
        opt.zero_grad(set_to_none=False)  # a graph's gradients live in buffers it keeps
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        return loss.detach()

    return Replay(step, graph, name)


def _run(cfg: RunConfig, record: Dict[str, Any]) -> None:
    from mom_bench.models import build_model
    from mom_bench.tasks.mqar import build_mqar

    runtime.seed_everything(cfg.seed)
    device = runtime.device(cfg.device)
    record["hardware"] = runtime.hardware(device.type)
    train_slices, test_slices = build_mqar(cfg.data)
    model = build_model(cfg.model, cfg.data.vocab_size).to(device)
    record["model"] = records.model_summary(model, record["config"]["model"], max(s.seq_len for s in test_slices))

    o = cfg.optim
    # On CUDA the train and evaluation steps are replayed from CUDA graphs (mom_bench.graphs) unless
    # cuda_graph is false; the optimizer is the capturable one on CUDA either way, so that the setting
    # changes the speed and not the numbers (replayed and eager steps agree to the last digit).
    graph = device.type == "cuda" and cfg.cuda_graph
    opt = optimizer(model, o, capturable=device.type == "cuda")
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = sum(math.ceil(len(s.inputs) / cfg.data.batch_size) for s in train_slices)
    total = o.epochs * steps_per_epoch
    log_every = max(1, total // LOSS_POINTS)
    # The data is small next to GPU memory: move it once instead of copying every batch.
    data = [supervised(s, device) for s in train_slices]

    step_fn = train_step(model, opt, o.grad_clip, device, graph, f"{record['run_id']}: train step")
    correct = Replay(correct_counter(model, device), graph, f"{record['run_id']}: evaluation step")

    curve: List[List[float]] = []
    window: List[torch.Tensor] = []  # losses since the last check, kept on the device (no sync per step)
    history: List[Dict[str, Any]] = []
    step = tokens = 0
    train_time = eval_time = 0.0
    best = {"mean": -1.0}

    def check_losses() -> None:
        # One host sync per window: find the first non-finite loss, else add the window's mean to the curve.
        vals = torch.stack(window).float().cpu()
        bad = (~torch.isfinite(vals)).nonzero()
        if len(bad):
            k = int(bad[0])
            raise NonFiniteLoss(f"loss became {vals[k].item()} at step {step - len(vals) + k + 1}")
        curve.append([step, round(vals.mean().item(), 5)])
        window.clear()

    bar = tqdm(total=total, disable=not cfg.progress, desc=record["run_id"][:40], dynamic_ncols=True)
    model.train()
    for epoch in range(1, o.epochs + 1):
        t0 = time.perf_counter()
        for i, idx in _batches(train_slices, cfg.data.batch_size, gen, device):
            x, positions, y = (t[idx] for t in data[i])
            factor = _lr_factor(step, o.warmup_steps, total)
            for group in opt.param_groups:
                if torch.is_tensor(group["lr"]):
                    group["lr"].fill_(o.lr * factor)
                else:
                    group["lr"] = o.lr * factor
            window.append(step_fn(x, positions, y))
            step, tokens = step + 1, tokens + x.numel()
            bar.update()
            if len(window) == log_every:
                check_losses()
                shown = {"acc": round(history[-1]["mean"], 3)} if history else {}
                bar.set_postfix(loss=curve[-1][1], **shown)
        if window:
            check_losses()  # before evaluating weights that may already be NaN
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time

        t0 = time.perf_counter()
        acc = evaluate(model, test_slices, cfg.data.test_batch_size, device, correct=correct)  # ends synced
        seconds = time.perf_counter() - t0
        eval_time += seconds
        mean = sum(acc.values()) / len(acc)
        history.append({"epoch": epoch, "mean": mean, "accuracy": acc, "train_time_s": round(epoch_time, 3),
                        "eval_time_s": round(seconds, 3)})
        if mean > best["mean"]:
            best = {"mean": mean, "epoch": epoch, "accuracy": acc}
        bar.set_postfix(loss=curve[-1][1], acc=round(mean, 3))
        if mean > o.early_stop:
            break
    bar.close()

    record.update({
        "accuracy": best["accuracy"], "mean_accuracy": best["mean"], "best_epoch": best["epoch"],
        "epochs_run": epoch, "steps": step, "eval_history": history, "loss_curve": curve,
        "train_tokens": tokens, "train_time_s": round(train_time, 3), "eval_time_s": round(eval_time, 3),
        "throughput_tokens_per_s": round(tokens / max(train_time, 1e-9), 1),
        # CUDA graphs captured (one per batch shape) and used: 0 where the steps ran eagerly
        "cuda_graphs": {"train": len(step_fn.graphs) if step_fn.enabled else 0,
                        "evaluation": len(correct.graphs) if correct.enabled else 0},
    })
