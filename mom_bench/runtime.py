"""What every command asks of the machine it runs on, with one behaviour for all of them: the device, mixed
precision, seeding, and the description of the hardware and package versions that records carry."""
from __future__ import annotations

import os
import platform
import random
import socket
from typing import Any, Dict, Optional

import numpy as np
import torch


def device(choice: Optional[str] = "auto", local_rank: Optional[int] = None) -> torch.device:
    """`auto` (or None): CUDA if there is a GPU, else the CPU; `cpu`; `cuda` or `cuda:N`, which must exist.
    Under torchrun `local_rank` picks each process's GPU for `auto` and `cuda`; a sweep's workers take
    one GPU each where there are several. Asking for CUDA where there is none is an error, never a silent
    run on the CPU."""
    if choice in (None, "", "auto"):
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(choice)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={choice} but CUDA is not available on {platform.node()}")
        if dev.index is None:
            index = local_rank if local_rank is not None else _sweep_gpu()
            if index is not None:
                dev = torch.device("cuda", index)
        if dev.index is not None:
            torch.cuda.set_device(dev)  # Triton launches on the current device
    return dev


def _sweep_gpu() -> Optional[int]:
    """On a host with several GPUs, a sweep's worker process takes a GPU of its own: its worker slot
    (`claims.sweep_slot`) modulo the GPU count; with one GPU, or outside a sweep, None. A launcher that
    gives each job its own GPU (Slurm's GPU requests, Ray's num_gpus) does it with CUDA_VISIBLE_DEVICES, so
    such a job sees one GPU and keeps it."""
    from mom_bench import claims

    count = torch.cuda.device_count()
    slot = claims.sweep_slot() if count > 1 else None
    return None if slot is None else slot % count


def autocast(dev: torch.device, dtype: Any = "auto"):
    """Mixed precision on `dev`: `auto` is bf16 on the GPU, as the reference runs train, and none on the
    CPU (CPU bf16 is slow and changes the numbers); a dtype forces it; None turns it off."""
    if dtype == "auto":
        dtype = torch.bfloat16 if dev.type == "cuda" else None
    return torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def hardware(device_type: str) -> Dict[str, Any]:
    """What a record says about where it ran."""
    name = torch.cuda.get_device_name() if device_type == "cuda" else _cpu_name()
    return {"device": device_type, "device_name": name, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "hostname": socket.gethostname()}


def version(package: str) -> Optional[str]:
    """The installed version of a distribution, or None."""
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as _version

        return _version(package)
    except PackageNotFoundError:
        return None


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
