"""Tokenizers for pretraining, evaluation and the recall tasks' truncation window.

`load_tokenizer(None)` (or "bytes") is a byte-level tokenizer that needs no download: ids 0..255 are the
UTF-8 bytes of the text and id 256 is the end-of-sequence token, so any text round-trips exactly and a
fresh machine can pretrain and evaluate offline. Any other name is a hub tokenizer loaded through
`transformers` (the `hf` extra), never with remote code.
"""
from __future__ import annotations

from typing import List, Optional, Protocol

BYTES = "bytes"


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> List[int]: ...

    def decode(self, ids: List[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes plus one EOS id. Decoding skips the EOS and replaces a cut multi-byte character."""

    name = BYTES
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: List[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HubTokenizer:
    """A `transformers` tokenizer behind the same small interface (no special tokens added on encode)."""

    def __init__(self, name: str):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ImportError(f"tokenizer {name!r} needs transformers: pip install 'mom_bench[hf]' "
                              f"(or use the offline default tokenizer {BYTES!r})") from None
        self.name = name
        self._tok = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
        if self._tok.eos_token_id is None:
            raise ValueError(f"tokenizer {name!r} has no end-of-sequence token")
        self.eos_id = int(self._tok.eos_token_id)
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: List[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(name: Optional[str] = None) -> Tokenizer:
    if name in (None, "", BYTES):
        return ByteTokenizer()
    return HubTokenizer(name)
