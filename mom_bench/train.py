"""One MQAR training run: ``train(cfg) -> record``.

The Zoology protocol (mqar.md): AdamW, cosine schedule to 0 (per step, or per epoch as Zoology steps it:
``optim.schedule``), evaluation on every test slice after each epoch, early stop once the mean accuracy
exceeds ``optim.early_stop``; the record keeps the best epoch's accuracy and the last one's (Zoology's). A run never raises for a training
failure: a non-finite loss, an out-of-memory error or a bug in a mixer is written into the run's record as
``failed`` so that the other points of a sweep still run. Only an invalid config (ConfigError) or a results
folder that cannot be written (records.RecordError) raises, before any work.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from mom_bench import claims, records, router_stats, runtime
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
    # try/finally, not `with claim:`: a Ctrl-C can land as `__enter__` starts, before a with block holds it
    try:
        if records.is_complete(path):
            log.info("skip %s: complete record exists at %s", rid, path)
            return records.load_record(path)
        record = _attempt(cfg, config, rid)
        _write(path, record)
    finally:
        claim.release()
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


def _lr_factor(step: int, warmup: int, total: int, schedule: str = "step", epoch: int = 0,
               epochs: int = 1) -> float:
    """`step` schedule: linear warm-up, then cosine from 1 to 0 over the remaining steps. `epoch` schedule
    (Zoology's CosineAnnealingLR with T_max = epochs, stepped after each epoch): (1 + cos(pi e / epochs)) / 2
    for the whole of epoch e = 0, 1, ...; the last epoch still trains at a small positive rate."""
    if schedule == "epoch":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
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


def optimizer(model, o, capturable: bool):
    """AdamW as the Zoology protocol sets it, or with `o.optimizer == "muon"` Muon and AdamW side by side
    (`Optimizers`, split by `muon_split`); `capturable` (CUDA) keeps AdamW's step count and learning rate on
    the device, as a CUDA graph needs: the schedule then fills `param_groups[i]["lr"]` in place."""
    device = next(model.parameters()).device
    lr = (lambda: torch.tensor(o.lr, device=device)) if capturable else (lambda: o.lr)
    if o.optimizer != "muon":
        return torch.optim.AdamW(model.parameters(), lr=lr(), betas=tuple(o.betas), weight_decay=o.weight_decay,
                                 capturable=capturable)
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"optim.optimizer: muon needs torch.optim.Muon, which torch {torch.__version__} lacks")
    matrices, rest = muon_split(model)
    # match_rms_adamw scales each matrix's orthogonalised update to AdamW's typical RMS (0.2 sqrt(max(A, B))),
    # so that one lr and one weight decay serve both optimizers (the Moonlight recipe): the lr grid stays.
    # Muon turns its lr into a Python number each step (a host sync a CUDA graph cannot hold): plain float.
    muon = torch.optim.Muon([p for _, p in matrices], lr=o.lr, weight_decay=o.weight_decay,
                            momentum=o.muon_momentum, nesterov=True, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([p for _, p in rest], lr=lr(), betas=tuple(o.betas), weight_decay=o.weight_decay,
                              capturable=capturable)
    return Optimizers([muon, adamw])


def muon_split(model) -> Tuple[List[Tuple[str, torch.nn.Parameter]], List[Tuple[str, torch.nn.Parameter]]]:
    """(Muon's, AdamW's) named parameters, as the Muon paper splits them: Muon takes the 2-D projection
    matrices of the blocks' mixers and MLPs (nn.Linear weights, and the memory mixers' query matrix `w_q`);
    AdamW takes the embeddings (the tied head is the token embedding), norms, biases, convolution taps, the
    decay and skip parameters, the gates (the memory mixers' output gate `gate`, MoM's `router`), and the
    memory mixers' fused per-memory input projections `w_in`: a 3-D stack (memories, d_model, q|k|v|a|b
    columns) whose a and b columns are gates, which torch.optim.Muon (2-D matrices only) cannot take."""
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    gates = {id(p) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in ("gate", "router")
             for p in m.parameters()}
    matrices, rest = [], []
    for name, p in model.named_parameters():
        in_block = name.startswith("blocks.") and (".mixer." in name or ".mlp." in name)
        projection = id(p) in linear_weights or name.endswith(".w_q")
        take = in_block and projection and p.ndim == 2 and id(p) not in gates
        (matrices if take else rest).append((name, p))
    return matrices, rest


class Optimizers:
    """Several optimizers stepped as one (Muon for the matrices, AdamW for the rest): `param_groups` lists
    every group, so the schedule reaches them all."""

    def __init__(self, optimizers: List[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


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
    model_cfg = cfg.model
    if model_cfg.positions == "learned" and not model_cfg.max_positions:  # as many rows as the longest input
        longest = max(s.inputs.shape[1] for s in [*train_slices, *test_slices])
        model_cfg = dataclasses.replace(model_cfg, max_positions=longest)
    model = build_model(model_cfg, cfg.data.vocab_size).to(device)
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

    train_graph = graph and o.optimizer != "muon"
    if graph and not train_graph:
        record["cuda_graph_note"] = ("train step eager: torch.optim.Muon reads its learning rate as a Python "
                                     "number every step, a host sync that a CUDA graph cannot capture")
        log.info("%s: %s", record["run_id"], record["cuda_graph_note"])
    step_fn = train_step(model, opt, o.grad_clip, device, train_graph, f"{record['run_id']}: train step")
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
            factor = _lr_factor(step, o.warmup_steps, total, o.schedule, epoch - 1, o.epochs)
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
        with router_stats.collect(model) as router:  # the MoM layers' routing on the test set ([] without)
            acc = evaluate(model, test_slices, cfg.data.test_batch_size, device, correct=correct)  # ends synced
        seconds = time.perf_counter() - t0
        eval_time += seconds
        mean = sum(acc.values()) / len(acc)
        history.append({"epoch": epoch, "mean": mean, "accuracy": acc, "train_time_s": round(epoch_time, 3),
                        "eval_time_s": round(seconds, 3), "router": router.layers})
        if mean > best["mean"]:
            best = {"mean": mean, "epoch": epoch, "accuracy": acc}
        bar.set_postfix(loss=curve[-1][1], acc=round(mean, 3))
        if mean > o.early_stop:
            break
    bar.close()

    record.update({
        "accuracy": best["accuracy"], "mean_accuracy": best["mean"], "best_epoch": best["epoch"],
        "last_accuracy": history[-1]["accuracy"], "last_mean_accuracy": history[-1]["mean"],
        "epochs_run": epoch, "steps": step, "eval_history": history, "loss_curve": curve,
        "train_tokens": tokens, "train_time_s": round(train_time, 3), "eval_time_s": round(eval_time, 3),
        "throughput_tokens_per_s": round(tokens / max(train_time, 1e-9), 1),
        # CUDA graphs captured (one per batch shape) and used: 0 where the steps ran eagerly
        "cuda_graphs": {"train": len(step_fn.graphs) if step_fn.enabled else 0,
                        "evaluation": len(correct.graphs) if correct.enabled else 0},
    })
