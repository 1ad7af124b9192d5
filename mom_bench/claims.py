"""Claims: a run takes `<results_dir>/runs/<run_id>.lock` before it trains, so that no point trains twice at
once, however many sweeps, workers or hosts share a results folder.

The lock is created with O_EXCL (atomic on local file systems and on NFS v3+) and holds the claimant's
host, pid and start time; a thread touches it every HEARTBEAT_S seconds while the run lives. A claim is
stale, and is taken over, when its heartbeat is older than STALE_S or when its process is gone on this
host. The same thread ends a worker whose sweep process died (`kill -9` of the parent leaves joblib's
workers running): it releases the claim and exits, so a restarted sweep trains the point again instead
of racing an orphan.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

from mom_bench import files

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_S = 120.0  # twelve missed heartbeats: a host under load or a slow file system still keeps its claim
# Set by the sweep's main process to "host:pid" for the workers it starts (mom_bench.sweep).
PARENT_ENV = "MOM_BENCH_SWEEP_PARENT"
EXIT_ORPHANED = 70


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holder(lock: Path) -> Optional[Dict[str, Any]]:
    try:
        info = json.loads(lock.read_text())
        info["age_s"] = time.time() - lock.stat().st_mtime
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _stale(info: Optional[Dict[str, Any]]) -> bool:
    if info is None:  # unreadable: a claimant that died between creating and filling the file, or junk
        return True
    if info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", -1))):
        return True
    return info["age_s"] > STALE_S


class Claim:
    """A held claim: release it with `release()` or by leaving its `with` block."""

    def __init__(self, lock: Path, token: str):
        self.lock, self.token = lock, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"claim {lock.stem}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        parent = _sweep_parent()
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.lock)
            except OSError:
                pass  # the next beat tries again; a claim that stays untouched is taken over
            if parent is not None and not _alive(parent):
                # joblib's workers ignore SIGINT, so the run cannot be interrupted: end the process. Its
                # record is not written (records are atomic), and the claim goes with it.
                log.error("the sweep process (pid %d) is gone: ending this worker", parent)
                self.release()
                os._exit(EXIT_ORPHANED)

    def release(self) -> None:
        self._stop.set()
        try:
            if (_holder(self.lock) or {}).get("token") == self.token:  # not one that took over a stale claim
                self.lock.unlink()
        except OSError:
            pass

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _sweep_parent() -> Optional[int]:
    """The pid of the sweep process that started this worker, when it is on this host and not us."""
    value = os.environ.get(PARENT_ENV, "")
    host, _, pid = value.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return None
    return int(pid)


def claim(record: Path) -> Optional[Claim]:
    """Claim the run whose record is `record`; None when a live process holds it."""
    lock = record.with_suffix(".lock")
    token = uuid.uuid4().hex
    info = {"host": socket.gethostname(), "pid": os.getpid(), "token": token,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, files.file_mode())
        except FileExistsError:
            held = _holder(lock)
            if not _stale(held):
                return None
            # Take a stale claim over: move it to a private name first, so that of several processes that
            # judged it stale only one removes it; then try to create ours again.
            aside = lock.with_name(f".{lock.name}.{token}")
            try:
                os.replace(lock, aside)
            except FileNotFoundError:
                continue
            taken = _holder(aside)
            if held is not None and (taken or {}).get("token") != held.get("token"):
                # Another process had already replaced the stale claim with a live one: put it back.
                try:
                    os.link(aside, lock)
                except OSError:
                    pass
                aside.unlink(missing_ok=True)
                return None
            aside.unlink(missing_ok=True)
            log.warning("taking over the stale claim %s (%s)", lock, describe(held))
            continue
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            return Claim(lock, token)
        except BaseException:  # Ctrl-C (or a full disk) between creating the lock and holding it: leave none
            lock.unlink(missing_ok=True)
            raise
    return None


def describe(info: Optional[Dict[str, Any]]) -> str:
    if info is None:
        return "unreadable lock"
    return f"host {info.get('host')}, pid {info.get('pid')}, since {info.get('started')}"


def holder(record: Path) -> str:
    """Who holds the claim on `record`, in words."""
    return describe(_holder(record.with_suffix(".lock")))


@functools.lru_cache(maxsize=None)
def worker_slot(folder: str) -> int:
    """This process's slot among the live processes that ask in `folder`: the lowest number no live
    process of this host holds, kept for the process's life. A sweep's workers take slots 0, 1, ... and
    so one GPU each on a host with several (`mom_bench.runtime.device`); a worker that died leaves its
    slot to the next one that asks."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    slot = 0
    while slot < 4096:
        path = root / f"slot{slot}"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(path.read_text())
            except (OSError, ValueError):  # being written by its new holder: not ours to judge
                pid = os.getpid()
            if pid == os.getpid() or _alive(pid):
                slot += 1
                continue
            aside = path.with_name(f".{path.name}.{os.getpid()}")
            try:  # of several processes that found the holder dead, only one moves its file aside
                os.replace(path, aside)
                aside.unlink()
            except OSError:
                pass
            continue  # and this slot is tried again
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return slot
    raise RuntimeError(f"no free worker slot in {root}")


def sweep_slot() -> Optional[int]:
    """The worker slot of this process within its sweep (None outside a sweep)."""
    value = os.environ.get(PARENT_ENV, "")
    if not value:
        return None
    safe = "".join(c if c.isalnum() else "_" for c in value)
    return worker_slot(os.path.join(tempfile.gettempdir(), "mom_bench-slots", safe))
