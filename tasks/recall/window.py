"""JRT "cutting context": keep a token window of the document centred on the answer.

A long document is cut to `budget = context_length - answer_length` tokens so that the prompt and
the answer fit the model's context. The window starts half a budget before the earliest
occurrence of the anchor (FDA / SWDE: the key or the value, SQuAD: the value), so the
evidence stays in the prompt wherever it sits. Upstream lm-eval instead left-truncates, which
cuts the answer out of many FDA documents.
"""

from __future__ import annotations

import re
from typing import Protocol, Sequence


class Tokenizer(Protocol):
    """What the window needs; `mom_bench.tokenizer.load_tokenizer` returns one."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def earliest_match(text: str, needles: Sequence[str]) -> int | None:
    """Character offset of the earliest case-insensitive occurrence of any non-blank needle.

    `re` with IGNORECASE rather than `text.lower().find`: lower-casing can change the length of
    some characters ("İ"), which would shift the offsets.
    """
    starts = [
        match.start()
        for needle in needles
        if needle and needle.strip()
        and (match := re.search(re.escape(needle.strip()), text, re.IGNORECASE))
    ]
    return min(starts) if starts else None


def window_start(anchor: int, n_tokens: int, budget: int) -> int:
    """First token of a `budget`-token window with half of it before `anchor`.

    Near the end the window is shifted left to stay full (it still holds the anchor, since
    the anchor lies within the last half budget); near the start it begins at token 0.
    """
    start = anchor - budget // 2
    return max(0, min(start, n_tokens - budget))


def cut_context(
    text: str, needles: Sequence[str], tokenizer: Tokenizer, budget: int
) -> tuple[str, bool]:
    """`text` cut to at most `budget` tokens around the earliest needle, and whether it was cut.

    A text that fits is returned untouched (no decode round trip that could alter it). When no
    needle occurs, the start of the document is kept: the answer is absent either way, and the
    start is where the documents name their subject. A cut window is stripped: whitespace at its
    arbitrary edges would only double the spaces around what the prompt adds.
    """
    if budget <= 0:
        raise ValueError(
            f"recall: the token budget context_length - answer_length is {budget}; it must be positive"
        )
    ids = tokenizer.encode(text)
    if len(ids) <= budget:
        return text, False
    char = earliest_match(text, needles)
    # The prefix length in tokens locates the anchor; at worst off by one token at the boundary.
    anchor = len(tokenizer.encode(text[:char])) if char is not None else 0
    start = window_start(anchor, len(ids), budget)
    return tokenizer.decode(ids[start : start + budget]).strip(), True
