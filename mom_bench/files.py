"""Atomic writes with the user's permissions: every file mom_bench leaves (records, reports, checkpoints)
goes through here.

A file is written to a temporary name in its destination folder and renamed into place, so a reader (or
a run killed mid-write) sees the old file or the new one, never half of one, and a failed write (a full
disk) leaves no empty file behind. `tempfile` creates files 0600 and folders 0700; collaborators on a
shared file system need the permissions the user's umask gives, as `open()` would, so they are set here.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def temp_dir(parent: PathLike, name: str) -> Path:
    """A new hidden folder beside `parent/name`, with the permissions `mkdir` would give."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp"))
    os.chmod(tmp, dir_mode())
    return tmp


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=1, allow_nan=True))


def copy(src: PathLike, dst: PathLike) -> Path:
    return write_bytes(dst, Path(src).read_bytes())


def replace_dir(tmp: PathLike, path: PathLike) -> None:
    """Rename the folder `tmp` to `path`. A folder cannot be renamed over another one, so an existing
    `path` is first moved aside; a kill between the two renames leaves the old one there, hidden."""
    tmp, path = Path(tmp), Path(path)
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
