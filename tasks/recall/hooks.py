"""The lm-eval entry points of the JRT recall tasks (named by `!function` in the YAML files).

lm-eval 0.4.x calls `custom_dataset(**metadata, **dataset_kwargs)` once per task. `metadata` is
the task YAML's metadata merged with the run's (`--metadata` JSON, `TaskManager(metadata=...)`;
`simple_evaluate` also merges the model_args into it), and `dataset_kwargs` names the task. That is
the only hook that sees the run's settings, so the whole prompt is built there, tokenizer window
included, and the documents reach lm-eval with a ready `prompt` field.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import datasets

from mom_bench.tasks.recall import data, prompts, window

log = logging.getLogger(__name__)

CONTEXT_LENGTH = 2048  # MoM / JRT defaults
ANSWER_LENGTH = 48


def load_docs(
    jrt_task: str,
    jrt_twice: bool = False,
    recall_data: str | None = None,
    tokenizer: Any = None,
    pretrained: Any = None,
    context_length: int | str = CONTEXT_LENGTH,
    answer_length: int | str = ANSWER_LENGTH,
    **_other_metadata: Any,  # version, config_source, other model_args: not ours
) -> dict[str, datasets.Dataset]:
    """The validation split of one recall task, each document with its JRT `prompt`."""
    source = data.data_source(jrt_task, recall_data)
    rows = data.read_rows(source)
    data.check_fields(rows, jrt_task, source)
    tok = data.resolve_tokenizer(tokenizer, pretrained)
    budget = int(context_length) - int(answer_length)
    docs = [build_doc(row, index, jrt_task, bool(jrt_twice), tok, budget) for index, row in enumerate(rows)]
    _log_summary(jrt_task, source, docs, budget)
    return {"validation": datasets.Dataset.from_list(docs)}


def build_doc(row: dict[str, Any], index: int, task: str, twice: bool, tok, budget: int) -> dict[str, Any]:
    """One lm-eval document: the prompt, the gold value, and whether the window cut the text."""
    text, value = str(row["text"]), str(row["value"])
    if task == "squad":
        key = ""
        passage, cloze = prompts.split_cloze(text, row.get("context"))
        passage, truncated = window.cut_context(passage, [value], tok, budget)
        prompt = prompts.cloze_prompt(passage, cloze, twice)
    else:
        key = str(row["key"])
        if task == "swde":
            text = prompts.drop_swde_summary(text)
        body = prompts.drop_query(text, key)
        body, truncated = window.cut_context(body, [key, value], tok, budget)
        prompt = prompts.key_value_prompt(body, key, twice)
    doc_id = row.get("doc_id")
    return {
        "doc_id": str(doc_id if doc_id is not None else index),
        "key": key,
        "value": value,
        "prompt": prompt,
        "truncated": truncated,
    }


def contains(generation: str | None, value: str) -> float:
    """1.0 when the gold value occurs in the generation (case-insensitive, literally), else 0.0.

    The value is stripped first (as upstream lm-eval's v1). A blank value scores 0.0: an empty
    pattern occurs in every string, so it would otherwise be a free hit.
    """
    value = value.strip()
    if not value or not generation:
        return 0.0
    return 1.0 if re.search(re.escape(value), generation, re.IGNORECASE) else 0.0


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"contains": contains(results[0], doc["value"])}


def _log_summary(task: str, source, docs: list[dict[str, Any]], budget: int) -> None:
    cut = sum(doc["truncated"] for doc in docs)
    blank = sum(not doc["value"].strip() for doc in docs)
    log.info("recall %s: %d documents from %s, %d cut to %d tokens", task, len(docs), source, cut, budget)
    if blank:
        log.warning("recall %s: %d documents have a blank value; they score 0", task, blank)
