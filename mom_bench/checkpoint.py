"""Checkpoints: a folder of safetensors and JSON that never holds pickled code.

    <dir>/config.json            format, the ModelConfig, vocabulary size, tokenizer name, free metadata
    <dir>/model.safetensors      the model's weights (fp32, as trained)
    <dir>/optimizer.safetensors  optional: the optimizer's tensors (AdamW moments and step counts)
    <dir>/train_state.json       optional: everything else needed to resume training: the optimizer's
                                 scalars and structure, the step, the data position, ...

Loading builds the model from config.json with `mom_bench.models.build_model` and reads tensors with
safetensors: nothing is unpickled and no code is imported from the checkpoint, so a checkpoint from an
untrusted source can at worst hold wrong numbers. Before the model is built, config.json is checked
against the tensor names and shapes in the header of model.safetensors (the expected shapes come from
the model built on the meta device), so a config.json that does not fit its weights (a vocabulary of
16 million, another d_model) fails with the tensors it gets wrong instead of allocating its model first.

A checkpoint is written into a hidden temporary folder beside its destination and renamed into place,
so a run killed mid-save leaves the previous checkpoint or none, never half of one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from mom_bench import files
from mom_bench.models import ModelConfig

FORMAT = "mom_bench-checkpoint"
VERSION = 1
CONFIG, WEIGHTS, OPTIMIZER, TRAIN_STATE = "config.json", "model.safetensors", "optimizer.safetensors", \
    "train_state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or unreadable; the message names the file and the cause."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model in eval mode and what config.json says about it."""

    model: torch.nn.Module
    config: ModelConfig
    vocab_size: int
    tokenizer: Optional[str]
    metadata: Dict[str, Any]
    path: Path


# ------------------------------------------------------------------------------------------------ saving
def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, config: ModelConfig | Dict[str, Any], *,
                    vocab_size: int, tokenizer: Optional[str] = None, metadata: Optional[Dict[str, Any]] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None,
                    train_state: Optional[Dict[str, Any]] = None) -> Path:
    """Write a checkpoint folder atomically (replacing one that exists) and return its path.

    `optimizer` and `train_state` (JSON-serialisable: step, data position, ...) make it resumable."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model_cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    meta = {"format": FORMAT, "version": VERSION, "model": model_cfg, "vocab_size": int(vocab_size),
            "tokenizer": tokenizer, "metadata": metadata or {}}
    tmp = files.temp_dir(path.parent, path.name)
    try:
        # contiguous clones: safetensors refuses views and tensors that share memory
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        if optimizer is not None or train_state is not None:
            tensors: Dict[str, torch.Tensor] = {}
            structure = _encode(optimizer.state_dict(), tensors, "optimizer") if optimizer is not None else None
            save_file(tensors, str(tmp / OPTIMIZER), metadata={"format": FORMAT})
            _write_json(tmp / TRAIN_STATE, {"optimizer": structure, "train_state": train_state or {}})
        _write_json(tmp / CONFIG, meta)  # last: a folder with config.json was written completely
        for file in tmp.iterdir():  # safetensors creates its files 0600: the umask decides, as for open()
            os.chmod(file, files.file_mode())
        _fsync_dir(tmp)
        files.replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems cannot open folders; the rename still orders the writes
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _encode(obj: Any, tensors: Dict[str, torch.Tensor], key: str) -> Any:
    """A nested state dict as JSON, its tensors moved to `tensors` under their path. Tuples and dicts
    with non-string keys (the optimizer's parameter indices) are tagged so that `_decode` restores them."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _encode(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {key} in a checkpoint (tensors and JSON values only)")


def _decode(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------- loading
def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or the latest checkpoint of a pretraining output folder (its checkpoints/)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder (expected one holding {CONFIG} and {WEIGHTS})")
    if (path / CONFIG).exists() or (path / WEIGHTS).exists():
        return path
    for root in (path / "checkpoints", path):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    raise CheckpointError(f"{path} holds no checkpoint: expected {CONFIG} and {WEIGHTS} in it, or step_* "
                          f"checkpoint folders in it or in its checkpoints/ folder")


def _read_json(file: Path, if_missing: str) -> Any:
    if not file.exists():
        raise CheckpointError(f"{file} is missing: {if_missing}")
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc}); the checkpoint is corrupt") from None


def read_config(path: str | os.PathLike) -> Dict[str, Any]:
    """config.json of a checkpoint folder, checked for its format."""
    path = Path(path)
    file = path / CONFIG
    meta = _read_json(file, f"{path} is not a complete mom_bench checkpoint")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a mom_bench checkpoint config (no \"format\": \"{FORMAT}\")")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{file} has format version {meta['version']}; this mom_bench reads up to "
                              f"{VERSION}: update mom_bench")
    for key in ("model", "vocab_size"):
        if key not in meta:
            raise CheckpointError(f"{file} lacks {key!r}; the checkpoint is corrupt")
    vocab = meta["vocab_size"]
    # JSON has one kind of number (1e9 arrives as a float), and to Python a bool is an int
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise CheckpointError(f"{file} has vocab_size {vocab!r}; it must be a positive integer")
    return meta


def model_config(meta: Dict[str, Any]) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(meta["model"]) - known)
    if unknown:
        raise CheckpointError(f"config.json has model settings this mom_bench does not know: {unknown}")
    return ModelConfig(**meta["model"])


def _read_tensors(file: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.exists():
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file} cannot be read ({exc}); the checkpoint is corrupt") from None


def _header_shapes(file: Path) -> Dict[str, Tuple[int, ...]]:
    """The name and shape of every tensor of a safetensors file, from its header: no tensor is read."""
    from safetensors import SafetensorError, safe_open

    if not file.exists():
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file} cannot be read ({exc}); the checkpoint is corrupt") from None


def _differences(expected: Dict[str, Tuple[int, ...]], found: Dict[str, Tuple[int, ...]], show: int = 3) -> str:
    """The first few tensors whose shape differs, that are missing or unexpected; '' if none."""
    wrong = [f"{k}: expected {list(expected[k])}, found {list(found[k])}"
             for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    parts = []
    for what, items in (("wrong shape", wrong), ("missing", [k for k in expected if k not in found]),
                        ("unexpected", [k for k in found if k not in expected])):
        if items:
            more = f" (and {len(items) - show} more)" if len(items) > show else ""
            parts.append(f"{what}: {'; '.join(items[:show])}{more}")
    return ". ".join(parts)


def check_weights(path: str | os.PathLike, model: torch.nn.Module, model_of: str = "the model") -> None:
    """Raise CheckpointError unless model.safetensors holds exactly the tensors of `model`'s state dict,
    with their shapes. Only the file's header is read, and `model` may be on the meta device, so nothing
    of the checkpoint's or the model's size is allocated."""
    file = Path(path) / WEIGHTS
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    differences = _differences(expected, _header_shapes(file))
    if differences:
        raise CheckpointError(f"{file} does not fit {model_of}: {differences}")


def load_weights(path: str | os.PathLike, model: torch.nn.Module, model_of: str = "the model") -> None:
    check_weights(path, model, model_of)  # before the tensors are read
    file = Path(path) / WEIGHTS
    weights = _read_tensors(file)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:  # anything the header check cannot see
        raise CheckpointError(f"{file} does not fit {model_of}: {exc}") from None


def _shape_model(path: Path, cfg: ModelConfig, vocab_size: int) -> torch.nn.Module:
    """The model of config.json on the meta device: every name and shape of its state dict, no memory."""
    from mom_bench.models import build_model

    # On the meta device a RuntimeError is a bad size (negative, overflowing), never a lack of memory.
    try:
        with torch.device("meta"):
            return build_model(cfg, vocab_size)
    except (ValueError, TypeError, RuntimeError, ArithmeticError) as exc:
        raise CheckpointError(f"{path / CONFIG} describes no model mom_bench can build: {exc}") from None


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Build the model of a checkpoint folder (or of the latest checkpoint under a pretraining output
    folder) from its config.json, load its weights, and return it in eval mode on `device`."""
    from mom_bench.models import build_model

    path = resolve(path)
    meta = read_config(path)
    cfg = model_config(meta)
    model_of = f"the model of its {CONFIG}"
    check_weights(path, _shape_model(path, cfg, meta["vocab_size"]), model_of)
    model = build_model(cfg, meta["vocab_size"])
    load_weights(path, model, model_of)
    return Checkpoint(model=model.to(device).eval(), config=cfg, vocab_size=meta["vocab_size"],
                      tokenizer=meta.get("tokenizer"), metadata=meta.get("metadata") or {}, path=path)


def load_train_state(path: str | os.PathLike, model: torch.nn.Module,
                     optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
    """Restore weights and optimizer state into existing objects; return the saved train_state dict."""
    path = Path(path)
    read_config(path)
    saved = _read_json(path / TRAIN_STATE, f"{path} holds weights only and cannot resume training")
    load_weights(path, model, "the model to resume")
    if optimizer is not None:
        if saved.get("optimizer") is None:
            raise CheckpointError(f"{path} was saved without optimizer state")
        state = _decode(saved["optimizer"], _read_tensors(path / OPTIMIZER))
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"optimizer state in {path} does not fit this optimizer: {exc}") from None
    return saved.get("train_state") or {}


# ------------------------------------------------------------------------------- checkpoints of a run
def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> List[Tuple[int, Path]]:
    """(step, folder) of every complete step_* checkpoint under root, oldest first. Hidden temporary
    folders of an interrupted save are not checkpoints and are skipped."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / CONFIG).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def prune_checkpoints(root: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (keep_last <= 0 keeps all) and leftovers of
    interrupted saves."""
    root = Path(root)
    if keep_last > 0:
        for _, p in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".step_*"):
        shutil.rmtree(p, ignore_errors=True)
