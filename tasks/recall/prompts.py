"""Prompt shapes of the "Just read twice" (JRT, arXiv 2407.05483) recall protocol.

Pure string functions, no tokenizer: `window.py` cuts the document to the context budget, and
`hooks.py` chains the two. The protocol is in /work/shared/reference/recall-tasks.md.

FDA / SWDE documents end with the question, a trailing ``key:``. The JRT prompt rebuilds it:
the document body, ending with ".", then " Key:" with the key capitalised. Splitting body and
question lets the truncation window work on the body alone, so the question is never cut off.
"""

from __future__ import annotations

import re

# SWDE documents end with a block that lists the answers; the protocol drops it before anything else.
_SWDE_SUMMARY = re.compile(r"Summary of information above", re.IGNORECASE)


def capitalise(key: str) -> str:
    """First letter upper-case, the rest kept: "mpaa_rating" -> "Mpaa_rating", "MPAA rating" stays.

    Not `str.capitalize()`, which would lower-case acronyms inside the key ("Mpaa rating").
    """
    key = key.strip()
    return key[:1].upper() + key[1:]


def drop_swde_summary(text: str) -> str:
    """Everything before "Summary of information above..." (the answer list), or the whole text."""
    match = _SWDE_SUMMARY.search(text)
    return text[: match.start()] if match else text


def drop_query(text: str, key: str) -> str:
    """The document without its trailing question ``key:`` (case-insensitive, spaces tolerated)."""
    query = re.compile(r"\s*" + re.escape(key.strip()) + r"\s*:\s*$", re.IGNORECASE)
    return query.sub("", text.rstrip())


def close_sentence(body: str) -> str:
    """Trailing whitespace (newlines included) and periods stripped, then exactly one "." added.

    The protocol says "newlines and periods"; spaces go too, or a body ending in ". \\n" would
    become ". ." after the period is added.
    """
    return body.rstrip(" \t\r\n.") + "."


def key_value_prompt(body: str, key: str, twice: bool) -> str:
    """FDA / SWDE prompt from a body that no longer holds the question (see `drop_query`)."""
    text = close_sentence(body)
    key = capitalise(key)
    if twice:
        return f"Information about {key}. {text}\n{text} {key}:"
    return f"{text} {key}:"


def split_cloze(text: str, context: str | None) -> tuple[str, str]:
    """SQuAD `text` as (passage, cloze): based-squad builds `text` as the passage then the cloze.

    The passage is the `context` field when `text` starts with it; otherwise (no usable
    `context`) the whole text is the passage and the cloze is empty.
    """
    text = text.strip()
    context = (context or "").strip()
    if context and text.startswith(context):
        return context, text[len(context):]
    return text, ""


def cloze_prompt(passage: str, cloze: str, twice: bool) -> str:
    """SQuAD prompt: `text.strip()` once; twice, the passage is read again before the cloze.

    The protocol defines "twice" only for FDA / SWDE. Repeating the passage alone (not the cloze,
    which ends mid-sentence where the answer starts) keeps the JRT idea: read the document twice,
    then answer; the prompt still ends exactly where the answer begins.
    """
    if twice:
        return f"{passage}\n{passage}{cloze}"
    return f"{passage}{cloze}"
