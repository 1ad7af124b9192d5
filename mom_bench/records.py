"""Run records, the contract between train, eval, bench and report: one JSON file per run at
``<results_dir>/runs/<run_id>.json``, written by `write_record` (atomic, the user's umask) and read back
only through `read_record` / `scan`, which check the fields below (`problem`) and set a bad record aside in
``runs/invalid/`` with the reason.

A record is the only output a run leaves that later steps read, so it holds everything needed to interpret
the run without the code that made it. Every record has

    kind      "mqar" (mom_bench.train), "eval" (mom_bench.evaluate) or "bench" (mom_bench.bench); MQAR
              records written before kinds existed have none, which reads as "mqar"
    run_id    the file's name without .json
    status    "complete", "failed" (with `reason` and `traceback`) or "running" (a benchmark saving its
              progress)
    hardware  `runtime.hardware`: device, device_name, cpu_count, torch, python, hostname

and, by kind:

    mqar   config (the resolved RunConfig: model, data, optim, seed, ...), model (`model_summary`: label,
           mixer, d_model, n_layers, params, state_size at the longest test length: total/active values
           summed over the layers (Zoology's count) with their fp32 bytes, and per_mixer {name: {total,
           active, bytes}} for one layer of each mixer), accuracy {slice: fraction} and mean_accuracy of the
           best epoch, best_epoch, last_accuracy and last_mean_accuracy of the last epoch run (Zoology
           reports that one), epochs_run, steps, eval_history [{epoch, mean, accuracy, train_time_s, eval_time_s, router}],
           where router (mom_bench.router_stats, on the whole test set; [] without MoM layers and in records
           written before it) is one entry per MoM layer: module, memories, topk, tokens, fraction (of the
           routed token-memory assignments, per memory), entropy (mean over tokens of the router softmax's,
           nats) and max_entropy (log memories); the best epoch's is eval_history[best_epoch - 1],
           loss_curve [[step, loss], ...], train_tokens, train_time_s and eval_time_s (summed over the
           epochs), throughput_tokens_per_s, cuda_graphs, started_at, ended_at, wall_time_s
    eval   config {model, eval}, checkpoint, model (`model_summary` at max_length), tokenizer, tasks,
           metadata, scores {task: value}, metrics, results (lm-eval's), n_samples, lm_eval_version
    bench  command, seconds, timings [{suite, case, name, pass, batch_size, seq_len, ms, ratio, peak_mb,
           tokens_per_s, ...}] (`tokens_per_s` may be left out when ms and batch_size are given)
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from mom_bench import files

log = logging.getLogger(__name__)

# Keys that say where or how verbosely a run happens but not what it computes: two configs differing only
# here are the same run, so they share a run_id and a finished one is not repeated.
NON_RESULT_KEYS = ("progress", "results_dir", "sweep_name", "cuda_graph", "reported_epoch")


def model_label(model: Dict[str, Any]) -> str:
    """`mixer` for plain models; the layer pattern run-length encoded for hybrids (`momx3+attention`)."""
    pattern = model.get("pattern")
    if not pattern:
        return model["mixer"]
    runs: List[List[Any]] = []
    for name in pattern:
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    return "+".join(name if n == 1 else f"{name}x{n}" for name, n in runs)


def model_summary(model, config: Dict[str, Any], seq_len: int) -> Dict[str, Any]:
    """The `model` block of a record: label, size and recurrent state (fp32 bytes) at `seq_len` tokens
    (attention's KV cache grows with the length; a memory's state does not)."""
    state = model.state_size(seq_len)
    # Both counts: Zoology's, summed over the layers (a hybrid's convolution layer included, each attention
    # layer once), which `total` already is; and per mixer, one layer of each mixer the model has.
    blocks = getattr(model, "blocks", [])  # a LanguageModel's; stand-ins in tests may have none
    names = config.get("pattern") or [config["mixer"]] * len(blocks)
    per_mixer: Dict[str, Any] = {}
    for name, block in zip(names, blocks):
        per_mixer.setdefault(name, block.mixer.state_size(seq_len))
    return {"label": model_label(config), "mixer": config["mixer"], "d_model": config["d_model"],
            "n_layers": config["n_layers"], "params": sum(p.numel() for p in model.parameters()),
            "state_size": {**state, "total_bytes": 4 * state["total"], "active_bytes": 4 * state["active"],
                           "per_mixer": {name: {**s, "bytes": 4 * s["total"]} for name, s in per_mixer.items()}}}



def slice_name(s: Dict[str, Any]) -> str:
    return f"L{s['seq_len']}_n{s['num_kv_pairs']}"


def train_label(data: Dict[str, Any]) -> str:
    return "+".join(slice_name(s) for s in data["train"])


# A run id is a file name: the slug is cut so that the whole name stays far below the 255 bytes most file
# systems allow (a long hybrid `pattern` would pass it), and the hash keeps cut slugs distinct.
MAX_SLUG = 120


def run_id(config: Dict[str, Any]) -> str:
    """Readable slug plus a hash of everything that changes the result, e.g.
    `attention_d64_L64_n4_lr0.001_s123_1a2b3c4d`; at most MAX_SLUG + 9 characters."""
    kept = {k: v for k, v in config.items() if k not in NON_RESULT_KEYS}
    digest = hashlib.sha1(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:8]
    m = config["model"]
    lr = f"{config['optim']['lr']:g}".replace("e+", "e")  # 1e+09 -> 1e09: '+' is replaced below
    slug = f"{model_label(m)}_d{m['d_model']}_{train_label(config['data'])}_lr{lr}_s{config['seed']}"
    return f"{slug.replace('+', '-')[:MAX_SLUG]}_{digest}"


def record_path(results_dir: str | os.PathLike, rid: str) -> Path:
    return Path(results_dir) / "runs" / f"{rid}.json"


def write_record(path: str | os.PathLike, record: Dict[str, Any]) -> None:
    """Write atomically (mom_bench.files): a run killed mid-write (SLURM timeout, Ctrl-C) leaves the old
    record or none, never half a JSON file."""
    files.write_json(path, record)


def check_writable(results_dir: str | os.PathLike) -> None:
    """Create `<results_dir>/runs/` and prove a file can be written there, before any training: a run must
    not find out after hours that its record has nowhere to go. Raises RecordError."""
    runs = Path(results_dir) / "runs"
    try:
        runs.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=runs, prefix=".probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RecordError(f"cannot write run records to {runs}: {exc.strerror or exc}") from None


def fallback_path(rid: str) -> Path:
    """Where a record goes when its results folder could not take it (a full disk, a lost mount)."""
    return Path(tempfile.gettempdir()) / "mom_bench-records" / f"{rid}.json"


# ------------------------------------------------------------------------------------ reading records
class RecordError(RuntimeError):
    """A record cannot be written or read; the message names the file and the cause."""


KINDS = ("mqar", "bench", "eval")
STATUSES = ("complete", "failed", "running")  # running: a benchmark record written while it measures
INVALID = "invalid"  # runs/invalid/: records that failed validation, moved aside with a .reason file


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def problem(rec: Any) -> Optional[str]:
    """Why `rec` is not a valid record, or None. Checks what the sweep, the tables and the figures read,
    so that a record that passes cannot make them fail."""
    if not isinstance(rec, dict):
        return f"is a JSON {type(rec).__name__}, not an object"
    if not isinstance(rec.get("run_id"), str) or not rec["run_id"]:
        return "has no run_id"
    if rec.get("status") not in STATUSES:
        return f"status {rec.get('status')!r} is not one of {', '.join(STATUSES)}"
    kind = rec.get("kind", "mqar")
    if kind not in KINDS:
        return f"kind {kind!r} is not one of {', '.join(KINDS)}"
    complete = rec["status"] == "complete"
    if kind == "mqar":
        c = rec.get("config")
        if not isinstance(c, dict):
            return "has no config"
        for part in ("model", "data", "optim"):
            if not isinstance(c.get(part), dict):
                return f"config has no {part}"
        m, d = c["model"], c["data"]
        if not isinstance(m.get("mixer"), str) or not isinstance(m.get("d_model"), int):
            return "config.model needs a mixer name and an integer d_model"
        train = d.get("train")
        if not isinstance(train, list) or not train or not all(
                isinstance(s, dict) and isinstance(s.get("seq_len"), int) and isinstance(s.get("num_kv_pairs"), int)
                for s in train):
            return "config.data.train needs slices with integer seq_len and num_kv_pairs"
        if not _number(c["optim"].get("lr")):
            return "config.optim.lr is not a number"
        if complete:
            acc = rec.get("accuracy")
            if not isinstance(acc, dict) or not acc or not all(_number(v) for v in acc.values()):
                return "a complete record needs accuracy: {slice: number}"
            if not _number(rec.get("mean_accuracy")):
                return "a complete record needs a numeric mean_accuracy"
    elif kind == "eval" and complete:
        scores = rec.get("scores")
        if not isinstance(scores, dict) or not all(_number(v) for v in scores.values()):
            return "a complete eval record needs scores: {task: number}"
    elif kind == "bench":
        timings = rec.get("timings")
        if not isinstance(timings, list) or not all(
                isinstance(t, dict) and isinstance(t.get("name"), str) and _number(t.get("seq_len"))
                for t in timings):
            return "a bench record needs timings: [{name, seq_len, ms, ...}]"
    return None


def read_record(path: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """The record at `path`, None when there is none; raises RecordError naming the file when it cannot be
    parsed (a truncated file) or is not a valid record."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RecordError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        rec = json.loads(text)
    except ValueError as exc:
        raise RecordError(f"{path}: not valid JSON ({exc})") from None
    reason = problem(rec)
    if reason:
        raise RecordError(f"{path}: {reason}")
    return rec


def set_aside(path: str | os.PathLike, reason: str) -> Optional[Path]:
    """Move a bad record to `runs/invalid/` beside a `.reason` file, never deleting it; return where it
    went (None if another process moved it first)."""
    path = Path(path)
    dest = path.parent / INVALID / path.name
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        files.write_text(dest.with_name(dest.name + ".reason"), reason + "\n")
    except FileNotFoundError:
        return None
    except OSError as exc:  # a results folder we may read but not change (another user's)
        log.warning("invalid record %s; it stays where it is (%s)", reason, exc.strerror or exc)
        return None
    log.warning("invalid record %s, moved to %s", reason, dest)
    return dest


def load_record(path: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """The valid record at `path`, or None: none exists, or it was invalid and has been set aside (so the
    run counts as not done and is run again)."""
    try:
        return read_record(path)
    except RecordError as exc:
        set_aside(path, str(exc))
        return None


def is_complete(path: str | os.PathLike) -> bool:
    rec = load_record(path)
    return rec is not None and rec.get("status") == "complete"


def scan(root: str | os.PathLike) -> Tuple[List[Dict[str, Any]], List[Dict[str, str]]]:
    """Every valid record under `root` (any depth of `runs/` folders), sorted by run_id, and every invalid
    one as {path, reason}: those set aside now or before, and those that could not be moved."""
    valid, invalid = [], []
    for p in sorted(Path(root).rglob("runs/*.json")):
        try:
            rec = read_record(p)
        except RecordError as exc:
            moved = set_aside(p, str(exc))
            if moved is None and p.exists():
                invalid.append({"path": str(p), "reason": str(exc)})
            continue
        if rec is not None:
            valid.append(rec)
    for p in sorted(Path(root).rglob(f"runs/{INVALID}/*.json")):
        reason = p.with_name(p.name + ".reason")
        invalid.append({"path": str(p), "reason": reason.read_text().strip() if reason.exists() else "invalid"})
    return sorted(valid, key=lambda r: r["run_id"]), invalid


def load_records(root: str | os.PathLike) -> List[Dict[str, Any]]:
    """Every valid record under `root`; invalid ones are set aside (see `scan`)."""
    return scan(root)[0]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
