"""The lm-eval entry points of the JRT recall tasks (named by `!function` in the YAML files).

lm-eval 0.4.x calls `custom_dataset(**metadata, **dataset_kwargs)` once per task. `metadata` is
the task YAML's metadata (where `context_length` and `answer_length` are set) merged with the run's
(`--metadata` JSON, `TaskManager(metadata=...)`; `simple_evaluate` and the CLI also merge the
model_args into it), and `dataset_kwargs` names the task. That is the only hook that sees the run's
settings, so the whole protocol runs there (document set, window, prompt; PROTOCOL.md), and the
documents reach lm-eval with a ready `prompt` field.
"""

from __future__ import annotations

import difflib
import logging
import re
from typing import Any

import datasets

from mom_bench.tasks.recall import data, prompts, window

log = logging.getLogger(__name__)

METADATA_KEYS = ("recall_data", "tokenizer", "context_length", "answer_length")
# The strings the window centres on (the reference's answer keys): FDA / SWDE the key or the value,
# whichever occurs first, SQuAD the value.
ANCHOR_FIELDS = {"fda": ("key", "value"), "swde": ("key", "value"), "squad": ("value",)}


def load_docs(
    jrt_task: str,
    jrt_twice: bool = False,
    *,
    context_length: Any,
    answer_length: Any,
    recall_data: str | None = None,
    tokenizer: Any = None,
    pretrained: Any = None,
    **other_metadata: Any,  # version, config_source, the model_args: not ours
) -> dict[str, datasets.Dataset]:
    """The validation split of one recall task, each kept document with its JRT `prompt`."""
    check_metadata_keys(other_metadata)
    budget = metadata_int("context_length", context_length) - metadata_int("answer_length", answer_length)
    twice = bool(jrt_twice)
    source = data.data_source(jrt_task, recall_data)
    rows = data.read_rows(source)
    data.check_fields(rows, jrt_task, source, twice)
    tok = data.resolve_tokenizer(tokenizer, pretrained)
    docs, dropped = [], 0
    for index, row in enumerate(rows):
        doc_id = str(row["doc_id"]) if row.get("doc_id") is not None else str(index)
        if jrt_task == "swde":
            check_swde_summary(row["text"], doc_id, index, source)
        anchors = [str(row[field]) for field in ANCHOR_FIELDS[jrt_task]]
        # The protocol drops a document whose key or value is blank or one character long: such a
        # value (e.g. "R") would occur in almost any generation.
        if any(len(anchor) <= 1 for anchor in anchors):
            dropped += 1
            continue
        docs.append(build_doc(row, doc_id, jrt_task, twice, tok, budget, anchors))
    log.info("recall %s%s: %d documents from %s, %d of them cut to %d tokens; %d dropped (key or value "
             "shorter than 2 characters)", jrt_task, " twice" if twice else "", len(docs), source,
             sum(doc["truncated"] for doc in docs), budget, dropped)
    if not docs:
        raise ValueError(f"recall: no {jrt_task} document of {source} is left once those whose key or value is "
                         f"shorter than 2 characters are dropped ({dropped} dropped)")
    return {"validation": datasets.Dataset.from_list(docs)}


def build_doc(row: dict[str, Any], doc_id: str, task: str, twice: bool, tok, budget: int,
              anchors: list[str]) -> dict[str, Any]:
    """One lm-eval document: the prompt, the gold value, and whether the window dropped tokens."""
    text, truncated = window.cut(str(row["text"]), anchors, tok, budget)
    if task == "squad":
        key = ""
        prompt = prompts.squad_prompt(text, str(row.get("question", "")), str(row.get("context", "")), twice)
    else:
        key = str(row["key"])
        prompt = prompts.key_value_prompt(text, key, task, twice)
    return {"doc_id": doc_id, "key": key, "value": str(row["value"]), "prompt": prompt, "truncated": truncated}


def check_swde_summary(text: str, doc_id: str, index: int, source) -> None:
    """The reference splits every SWDE document on its summary phrase and stops with an error unless
    the phrase occurs exactly once; stop here too, naming the document, rather than score it some
    other way."""
    count = str(text).count(prompts.SWDE_SUMMARY)
    if count != 1:
        raise ValueError(
            f"recall: SWDE document {doc_id} (row {index} of {source}) holds {prompts.SWDE_SUMMARY!r} "
            f"{count} times; the protocol needs it exactly once (hazyresearch/based-swde-v2 documents "
            "have it once)"
        )


def check_metadata_keys(other: dict[str, Any]) -> None:
    """A key that looks like one of ours but is not (`recall-data`, `Context_Length`, `answer_len`)
    is an error: silently ignored, it would run the default protocol instead.

    Other keys pass: lm-eval merges every model argument (pretrained, max_length, ...) into the
    metadata, so an exact list of allowed keys cannot exist.
    """
    canonical = {re.sub(r"[^a-z0-9]", "", key): key for key in METADATA_KEYS}
    for key in other:
        near = difflib.get_close_matches(re.sub(r"[^a-z0-9]", "", str(key).lower()), canonical, n=1, cutoff=0.85)
        if near:
            raise ValueError(f"recall: unknown metadata key {key!r} (did you mean {canonical[near[0]]!r}?); "
                             f"the recall tasks read {', '.join(METADATA_KEYS)}")


def metadata_int(name: str, value: Any) -> int:
    if not isinstance(value, bool) and isinstance(value, (int, str)):
        try:
            return int(value)
        except ValueError:
            pass
    raise ValueError(f"recall: metadata {name} must be an integer, got {value!r}")


def contains(generation: str | None, value: str) -> float:
    """1.0 when the gold value, as given (not stripped), occurs in the generation, case-insensitive
    and literally (regex characters escaped), else 0.0. Values shorter than 2 characters never get
    here: the document set drops them."""
    return 1.0 if re.search(re.escape(value), generation or "", re.IGNORECASE) else 0.0


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"contains": contains(results[0], doc["value"])}
