"""Where the recall documents come from, and which tokenizer measures them.

Data source, first that is set:
1. lm-eval metadata `recall_data` (`--metadata '{"recall_data": "..."}'`, `TaskManager(metadata=...)`),
2. the environment variable MOM_BENCH_RECALL_DATA,
3. the hub dataset (split validation), e.g. hazyresearch/based-fda.
A local source is a directory holding `<task>.jsonl` (or .json, .parquet, .csv; task = fda, swde,
squad), or one such file, used for whichever task reads it. The data are never shipped; the
fixtures under fixtures/ are hand-made documents in the same schema.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

HUB_IDS = {
    "fda": "hazyresearch/based-fda",
    "swde": "hazyresearch/based-swde-v2",  # the reference's; hazyresearch/based-swde is the older v1
    "squad": "hazyresearch/based-squad",
}
# What the prompts read; other columns (doc_id, file_name, title) are optional.
REQUIRED_FIELDS = {
    "fda": ("key", "value", "text"),
    "swde": ("key", "value", "text"),
    "squad": ("value", "text"),
}
TWICE_FIELDS = {"squad": ("question", "context")}  # SQuAD twice reads the question and the whole passage
ENV_VAR = "MOM_BENCH_RECALL_DATA"
FORMATS = ("jsonl", "json", "parquet", "csv")


def required_fields(task: str, twice: bool) -> tuple[str, ...]:
    return REQUIRED_FIELDS[task] + (TWICE_FIELDS.get(task, ()) if twice else ())


def data_source(task: str, recall_data: str | os.PathLike | None = None) -> str | Path:
    """The local file to read for `task`, or its hub id when no local source is set."""
    if task not in HUB_IDS:
        raise ValueError(f"recall: unknown task {task!r}; expected one of {sorted(HUB_IDS)}")
    local = recall_data or os.environ.get(ENV_VAR)
    if not local:
        return HUB_IDS[task]
    path = Path(local).expanduser()
    if path.is_dir():
        candidates = [path / f"{task}.{ext}" for ext in FORMATS]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"recall: no data for task {task!r} in {path}: looked for "
            + ", ".join(c.name for c in candidates)
        )
    if not path.is_file():
        raise FileNotFoundError(f"recall: data path {path} does not exist (set by recall_data / {ENV_VAR})")
    return path


def read_rows(source: str | Path) -> list[dict[str, Any]]:
    """Rows of a local file, or the validation split of a hub dataset."""
    if isinstance(source, str):
        import datasets  # lazy: only the hub path needs it

        return datasets.load_dataset(source, split="validation").to_list()
    suffix = source.suffix.lstrip(".").lower()
    try:
        if suffix == "jsonl":
            with source.open(encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if suffix == "json":
            rows = json.loads(source.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise ValueError("expected a JSON list of objects")
            return rows
        if suffix in ("parquet", "csv"):
            import pandas as pd

            # csv: every cell a string, an empty cell "" rather than NaN (values like "1996" stay text).
            if suffix == "parquet":
                frame = pd.read_parquet(source)
            else:
                frame = pd.read_csv(source, dtype=str, keep_default_na=False)
            return frame.to_dict(orient="records")
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"recall: cannot read {source}: {err}") from err
    raise ValueError(f"recall: unsupported data file {source}: expected one of .{', .'.join(FORMATS)}")


def check_fields(rows: list[dict[str, Any]], task: str, source: str | Path, twice: bool = False) -> None:
    """Fail early, naming the field and the source, rather than with a KeyError deep in lm-eval."""
    if not rows:
        raise ValueError(f"recall: {source} holds no rows for task {task!r}")
    fields = required_fields(task, twice)
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"recall: row {index} of {source} is not an object: {row!r:.80}")
        missing = [field for field in fields if row.get(field) is None]
        if missing:
            raise ValueError(
                f"recall: row {index} of {source} has no field {', '.join(map(repr, missing))} "
                f"(task {task!r}{' twice' if twice else ''} needs {', '.join(fields)}; "
                f"the row has {', '.join(row) or 'nothing'})"
            )


def resolve_tokenizer(tokenizer: Any = None, pretrained: Any = None):
    """The tokenizer that measures the context budget.

    `tokenizer` (metadata, or the model's model_args, which lm-eval's simple_evaluate merges into
    the metadata) wins; else the model's `pretrained` name; else the offline byte tokenizer. An
    object with encode/decode is used as is (tests inject one).
    """
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode"):
        return tokenizer
    for name in (tokenizer, pretrained):
        if isinstance(name, str) and name:
            return _load(name)
    return _load(None)


@lru_cache(maxsize=4)  # the six tasks of the group share one tokenizer
def _load(name: str | None):
    from mom_bench.tokenizer import load_tokenizer

    try:
        return load_tokenizer(name)
    except Exception as err:
        raise RuntimeError(
            f"recall: cannot load tokenizer {name!r} for the context window ({err}); name one with "
            f"--metadata '{{\"tokenizer\": \"<hub name or bytes>\"}}'"
        ) from err
