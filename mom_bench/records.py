"""Run records: one JSON file per training run, at ``<results_dir>/runs/<run_id>.json``.

A record is the only output a run leaves that later steps read (the sweep table, the reports), so it holds
everything needed to interpret the run without the code that made it: the resolved config, the model's
size and state, accuracies, the loss curve, timing and the hardware.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import socket
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

# Keys that say where or how verbosely a run happens but not what it computes: two configs differing only
# here are the same run, so they share a run_id and a finished one is not repeated.
NON_RESULT_KEYS = ("progress", "results_dir", "sweep_name")


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


def slice_name(s: Dict[str, Any]) -> str:
    return f"L{s['seq_len']}_n{s['num_kv_pairs']}"


def train_label(data: Dict[str, Any]) -> str:
    return "+".join(slice_name(s) for s in data["train"])


def run_id(config: Dict[str, Any]) -> str:
    """Readable slug plus a hash of everything that changes the result, e.g.
    `attention_d64_L64_n4_lr0.001_s123_1a2b3c4d`."""
    kept = {k: v for k, v in config.items() if k not in NON_RESULT_KEYS}
    digest = hashlib.sha1(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:8]
    m = config["model"]
    slug = (f"{model_label(m)}_d{m['d_model']}_{train_label(config['data'])}"
            f"_lr{config['optim']['lr']:g}_s{config['seed']}")
    return f"{slug.replace('+', '-')}_{digest}"


def record_path(results_dir: str | os.PathLike, rid: str) -> Path:
    return Path(results_dir) / "runs" / f"{rid}.json"


def write_record(path: str | os.PathLike, record: Dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, then os.replace. A run killed mid-write
    (SLURM timeout, Ctrl-C) leaves the old record or none, never half a JSON file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_record(path: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """The record at `path`, or None if there is none or it cannot be parsed."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_complete(path: str | os.PathLike) -> bool:
    rec = load_record(path)
    return rec is not None and rec.get("status") == "complete"


def load_records(root: str | os.PathLike) -> List[Dict[str, Any]]:
    """Every record under `root` (any depth of `runs/` folders), sorted by run_id."""
    recs = [load_record(p) for p in Path(root).rglob("runs/*.json")]
    return sorted((r for r in recs if r is not None), key=lambda r: r.get("run_id", ""))


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def hardware(device: str) -> Dict[str, Any]:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    return {
        "device": device,
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "hostname": socket.gethostname(),
    }


def _cpu_name() -> str:
    # platform.processor() is empty on most Linux systems; /proc/cpuinfo has the marketing name.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
