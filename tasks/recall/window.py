"""The JRT "cutting context" window (PROTOCOL.md, "The cut").

Every document is cut, whether it fits or not: `budget = context_length - answer_length` tokens of
the stripped text, starting half a budget before the anchor (the earliest occurrence of any of its
anchor strings) and never extending past the end, then decoded back to text. The window is therefore
shorter than the budget near the end of a document, and a fitting document loses its beginning when
the anchor lies more than half a budget in. Upstream lm-eval instead keeps the end of a long prompt,
which cuts the answer out of many FDA documents.
"""

from __future__ import annotations

import re
from typing import Protocol, Sequence


class Tokenizer(Protocol):
    """What the window needs; `mom_bench.tokenizer.load_tokenizer` returns one."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def anchor_offset(text: str, anchors: Sequence[str]) -> int:
    """Character offset of the earliest occurrence of any anchor, as given (not stripped),
    case-insensitive and literal; -1 when none occurs.

    `re` with IGNORECASE rather than `text.lower().find`: lower-casing can change the length of
    some characters ("İ"), which would shift the offsets.
    """
    starts = [m.start() for a in anchors if (m := re.search(re.escape(a), text, re.IGNORECASE))]
    return min(starts, default=-1)


def cut(text: str, anchors: Sequence[str], tokenizer: Tokenizer, budget: int) -> tuple[str, bool]:
    """The decoded window of `text` around its anchor, and whether it dropped any token."""
    if budget <= 0:
        raise ValueError(
            f"recall: the token budget context_length - answer_length is {budget}; it must be positive"
        )
    text = text.strip()
    ids = tokenizer.encode(text)
    # The anchor's token index is the token count of the text before it. With no anchor the offset
    # -1 slices off the last character only, so the anchor sits at the end and the window keeps
    # the last half budget: the reference does exactly this.
    anchor = len(tokenizer.encode(text[:anchor_offset(text, anchors)]))
    start = max(0, anchor - budget // 2)
    end = min(len(ids), start + budget)
    return tokenizer.decode(ids[start:end]), start > 0 or end < len(ids)
