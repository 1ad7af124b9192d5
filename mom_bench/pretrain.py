"""Language-model pretraining on text: ``pretrain(cfg)``, ``python -m mom_bench pretrain``.

Data. Documents come from a hub dataset streamed with `datasets` (`data.dataset`, `data.dataset_config`,
`data.split`, `data.text_field`) or from local files (`data.files`, a glob: a .txt file is one document,
a .jsonl file one document per line under `data.text_field`). They are tokenized (`data.tokenizer`: the
offline byte tokenizer by default, or a hub tokenizer), joined with EOS and cut into consecutive
sequences of `data.seq_len + 1` tokens (inputs and shifted targets; neighbours share one token). When
the source runs out it starts again (the next epoch).

Distributed. Under `torchrun --nproc_per_node=N` (WORLD_SIZE > 1) every rank reads the same packed
stream and keeps sequences j with j % N == rank, so an optimizer step consumes the same N * batch_size
* grad_accum sequences whatever N is; gradients are averaged by DDP. Only rank 0 writes.

Resuming. Checkpoints (`mom_bench.checkpoint`) go to `<out_dir>/checkpoints/step_XXXXXXXX/` every
`save_every` steps and at the end. They hold the weights, the optimizer state, the step and the data
position (documents read so far and the unused tokens in the packing buffer), so a run started again
in the same out_dir continues where its latest checkpoint left off and ends with the same weights as
a run that was never interrupted. The learning rate is a function of the step, and dropout is seeded
from (seed, rank, step) at every step, so there is no scheduler or random state to restore.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from mom_bench import checkpoint as ckpt
from mom_bench import records, runtime
from mom_bench.config import PretrainConfig, merge_checked, validate_pretrain

log = logging.getLogger(__name__)

LOSS_POINTS = 500  # the loss curve in pretrain.json keeps about this many points


# ------------------------------------------------------------------------------------------------- data
def iter_documents(data, skip: int = 0) -> Iterator[str]:
    """The documents of the configured source, from document number `skip` on (one pass)."""
    if data.files:
        files = sorted(glob.glob(os.path.expanduser(data.files), recursive=True))
        if not files:
            raise FileNotFoundError(f"data.files={data.files!r} matches no file")
        return _skip(_file_documents(files, data.text_field), skip)
    return _hub_documents(data, skip)


def _skip(docs: Iterator[str], n: int) -> Iterator[str]:
    for i, doc in enumerate(docs):
        if i >= n:
            yield doc


def _file_documents(files: List[str], field: str) -> Iterator[str]:
    for name in files:
        path = Path(name)
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        row = json.loads(line)
                        if field not in row:
                            raise KeyError(f"{path}:{line_no} has no field {field!r} (set data.text_field)")
                        yield str(row[field])
        elif path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")
        else:
            raise ValueError(f"{path}: data.files takes .txt and .jsonl files")


def _hub_documents(data, skip: int) -> Iterator[str]:
    import datasets

    ds = datasets.load_dataset(data.dataset, data.dataset_config, split=data.split, streaming=True)
    if skip:
        ds = ds.skip(skip)  # streamed: skips without tokenizing
    for row in ds:
        if data.text_field not in row:
            raise KeyError(f"dataset {data.dataset} has no column {data.text_field!r} (set data.text_field); "
                           f"columns: {sorted(row)}")
        yield row[data.text_field]


class PackedStream:
    """Token sequences of seq_len + 1 cut from the documents joined with EOS, with a resumable position.

    The position is (epoch, documents read in this epoch, the buffer of tokens not yet consumed); it
    changes only in `next_batch`, so it is the same on every rank at a step boundary.
    """

    def __init__(self, docs: Callable[[int], Iterator[str]], tokenizer, seq_len: int, rank: int = 0,
                 world_size: int = 1, position: Optional[Dict[str, Any]] = None):
        self.docs, self.tok, self.seq_len = docs, tokenizer, seq_len
        self.rank, self.world_size = rank, world_size
        position = position or {}
        self.epoch = position.get("epoch", 0)
        self.doc_index = position.get("doc_index", 0)
        self.buffer: List[int] = list(position.get("buffer", []))
        self._it: Optional[Iterator[str]] = None

    def position(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "doc_index": self.doc_index, "buffer": list(self.buffer)}

    def _next_document(self) -> List[int]:
        if self._it is None:
            self._it = self.docs(self.doc_index)
        text = next(self._it, None)
        if text is None and self.doc_index > 0:  # the source ran out: the next epoch starts
            self._it, self.epoch, self.doc_index = self.docs(0), self.epoch + 1, 0
            text = next(self._it, None)
        if text is None:
            raise ValueError("the pretraining data holds no document")
        self.doc_index += 1
        return self.tok.encode(text) + [self.tok.eos_id]

    def _next_sequence(self) -> List[int]:
        while len(self.buffer) < self.seq_len + 1:
            self.buffer += self._next_document()
        seq = self.buffer[: self.seq_len + 1]
        self.buffer = self.buffer[self.seq_len:]  # the last target is the next sequence's first input
        return seq

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """(batch_size, seq_len + 1) for this rank; world_size * batch_size sequences are consumed."""
        seqs = [self._next_sequence() for _ in range(batch_size * self.world_size)]
        return torch.tensor(seqs[self.rank::self.world_size], dtype=torch.long)


# ------------------------------------------------------------------------------------------ distributed
class Dist:
    """Rank, world size and device; a process group only when launched with WORLD_SIZE > 1 (torchrun)."""

    def __init__(self, device_choice: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = runtime.device(device_choice, self.local_rank)
        use_cuda = self.device.type == "cuda"
        if use_cuda:
            torch.cuda.set_device(self.device)
        self.initialized_here = False
        if self.world_size > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
            self.initialized_here = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= self.world_size
        return value

    def close(self) -> None:
        if self.initialized_here:
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------- training
def lr_at(step: int, o) -> float:
    """Linear warm-up to lr, then cosine to lr * min_lr_ratio at max_steps."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, o) -> torch.optim.AdamW:
    # Weight decay on matrices (projections, embedding); not on norms, biases or the decay parameters.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=o.lr, betas=tuple(o.betas))


def _config(cfg: Any) -> PretrainConfig:
    return OmegaConf.to_object(merge_checked(PretrainConfig, cfg))


def pretrain(cfg: Any, on_step: Optional[Callable[[int, float], None]] = None) -> Dict[str, Any]:
    """Pretrain (or resume) as configured; return the summary also written to <out_dir>/pretrain.json.

    `cfg` is a PretrainConfig, a dict or a DictConfig. `on_step(step, loss)` is called after every
    optimizer step (tests use it to interrupt a run)."""
    from mom_bench.models import build_model
    from mom_bench.tokenizer import load_tokenizer

    cfg = _config(cfg)
    validate_pretrain(cfg)
    config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    dist = Dist(cfg.device)
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        torch.manual_seed(cfg.seed)  # the initial weights: the same on every rank
        model = build_model(cfg.model, tokenizer.vocab_size).to(dist.device)
        optimizer = make_optimizer(model, cfg.optim)
        out = Path(cfg.out_dir)
        root = out / "checkpoints"
        step, position, history = 0, None, {"loss_curve": [], "tokens": 0, "train_time_s": 0.0}
        latest = ckpt.latest_checkpoint(root) if cfg.resume else None
        if latest is not None:
            state = ckpt.load_train_state(latest, model, optimizer)
            step, position = state["step"], state["data"]
            history = state.get("history", history)
            if dist.main:
                log.info("resuming from %s (step %d)", latest, step)
        stream = PackedStream(lambda skip: iter_documents(cfg.data, skip), tokenizer, cfg.data.seq_len,
                              dist.rank, dist.world_size, position)
        ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.device] if
                                                         dist.device.type == "cuda" else None)
               if dist.world_size > 1 else model)

        def save(at: int) -> None:
            if dist.main:
                train_state = {"step": at, "data": stream.position(), "history": history, "config": config}
                ckpt.save_checkpoint(ckpt.step_dir(root, at), model, cfg.model, vocab_size=tokenizer.vocab_size,
                                     tokenizer=tokenizer.name, optimizer=optimizer, train_state=train_state,
                                     metadata={"step": at, "context_length": cfg.data.seq_len,
                                               "pretrain_config": config})
                ckpt.prune_checkpoints(root, cfg.keep_last)
            dist.barrier()  # no rank goes on (or exits) before the checkpoint is complete

        _train_loop(cfg, ddp, optimizer, stream, dist, step, history, save, on_step)
        summary = {"status": "complete", "out_dir": str(out), "steps": cfg.optim.max_steps,
                   "checkpoint": str(ckpt.step_dir(root, cfg.optim.max_steps)), "tokenizer": tokenizer.name,
                   "vocab_size": tokenizer.vocab_size, "params": sum(p.numel() for p in model.parameters()),
                   "world_size": dist.world_size, "hardware": runtime.hardware(dist.device.type),
                   "config": config, **history,
                   "throughput_tokens_per_s": round(history["tokens"] / max(history["train_time_s"], 1e-9), 1)}
        if dist.main:
            records.write_record(out / "pretrain.json", summary)
            _log_end(summary, step, out / "pretrain.json")
        return summary
    finally:
        dist.close()


def _log_end(summary: Dict[str, Any], start_step: int, record: Path) -> None:
    """What the run did and where its results are (under Hydra: on the console and in its pretrain.log)."""
    curve = summary["loss_curve"]
    resumed = f" ({summary['steps'] - start_step} in this run)" if start_step else ""
    log.info("pretrain done: %d steps%s, final loss %s, %s tokens/s", summary["steps"], resumed,
             f"{curve[-1][1]:.4f}" if curve else "n/a", summary["throughput_tokens_per_s"])
    log.info("final checkpoint: %s", summary["checkpoint"])
    log.info("summary: %s", record)


def _train_loop(cfg: PretrainConfig, model, optimizer, stream: PackedStream, dist: Dist, step: int,
                history: Dict[str, Any], save: Callable[[int], None],
                on_step: Optional[Callable[[int, float], None]]) -> None:
    o = cfg.optim
    autocast = runtime.autocast(dist.device)
    log_every = max(cfg.log_every, o.max_steps // LOSS_POINTS)
    bar = tqdm(total=o.max_steps, initial=step, disable=not (cfg.progress and dist.main), desc="pretrain",
               dynamic_ncols=True)
    window: List[torch.Tensor] = []
    model.train()
    while step < o.max_steps:
        t0 = time.perf_counter()
        # Dropout masks depend on (seed, rank, step) only: a resumed run draws the ones it would have drawn.
        torch.manual_seed(cfg.seed * 1_000_003 + dist.rank * 7_919 + step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, o)
        total = torch.zeros((), device=dist.device)
        for micro in range(o.grad_accum):
            batch = stream.next_batch(cfg.data.batch_size).to(dist.device, non_blocking=True)
            x, y = batch[:, :-1], batch[:, 1:]
            # DDP averages gradients on the last micro-batch only
            sync = micro == o.grad_accum - 1 or dist.world_size == 1
            with (nullcontext() if sync else model.no_sync()), autocast:
                logits, aux = model(x)
                loss = (F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) + aux) / o.grad_accum
            loss.backward()
            total += loss.detach()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history["tokens"] += x.numel() * o.grad_accum * dist.world_size
        window.append(total)
        checkpoint_due = step % cfg.save_every == 0 or step == o.max_steps
        # a point at every checkpoint too, so that a resumed run's curve equals an uninterrupted one's
        if step % log_every == 0 or checkpoint_due:
            mean = dist.mean(torch.stack(window).mean()).item()
            window.clear()
            if not math.isfinite(mean):
                raise FloatingPointError(f"loss became {mean} at step {step}")
            history["loss_curve"].append([step, round(mean, 5)])
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr_at(step - 1, o):.2e}")
        history["train_time_s"] = round(history["train_time_s"] + time.perf_counter() - t0, 3)
        bar.update()
        if checkpoint_due:
            save(step)
        if on_step is not None:
            on_step(step, total.item())
    bar.close()
