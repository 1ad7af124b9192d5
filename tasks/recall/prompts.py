"""Prompt texts of the JRT recall protocol (PROTOCOL.md), built from the cut window of a document.

Pure string functions: `window.py` cuts the document, `hooks.py` chains the two. The rules are the
reference's to the character, including where its variants differ from each other (the order in
which FDA, SWDE and SWDE-twice strip the end of the body), since each difference changes prompts.
"""

from __future__ import annotations

# SWDE documents carry, after the page, a block listing key/value pairs that starts with this exact
# phrase; the prompt keeps only what precedes it (the block would give the answer away).
SWDE_SUMMARY = "Summary of information above..."

# How each FDA / SWDE prompt cleans the end of its body before closing it with ".": the str.strip
# arguments in order (None: whitespace). FDA strips no spaces, so "end. " closes as "end. .".
CLOSE_STRIPS = {
    ("fda", False): ("\n", "."),
    ("fda", True): ("\n", "."),
    ("swde", False): (None, "."),
    ("swde", True): ("\n", ".", None),
}


def drop_query(text: str, key: str) -> str:
    """`text` without its trailing question: ``key:`` matched case-insensitively, removed as often as
    it repeats; only that exact suffix (``key :`` stays), with the key as given, spaces and all."""
    query = key + ":"
    while text.lower().endswith(query.lower()):
        text = text[: -len(query)]
    return text


def key_value_prompt(window: str, key: str, task: str, twice: bool) -> str:
    """FDA / SWDE prompt: the body, closed with ".", then the key, first letter upper-cased, and ":".

    Twice: ``Information about {Key}. {body}\\n{body} {Key}:``, the body read twice.
    """
    if task == "swde":
        window = window.split(SWDE_SUMMARY)[0]
    body = drop_query(window, key)
    for chars in CLOSE_STRIPS[task, twice]:
        body = body.strip(chars)
    if not body.endswith("."):
        body += "."
    # Only the first letter changes: "MPAA rating" stays (str.capitalize would give "Mpaa rating").
    question = key[:1].upper() + key[1:] + ":"
    if twice:
        return f"Information about {question.strip(':')}. {body}\n{body} {question}"
    return f"{body} {question}"


def squad_prompt(window: str, question: str, context: str, twice: bool) -> str:
    """SQuAD prompt: the cut text (passage and cloze, cut as one), stripped.

    Twice: the question, the whole passage (`context`, uncut, up to any "Question:"), then the cut
    text; the model's own truncation then decides how much of the front it sees.
    """
    if twice:
        return f"{question} {context.split('Question:')[0]}\n{window.strip()}"
    return window.strip()
