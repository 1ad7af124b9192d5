"""Softmax attention (SDPA) with rotary positions; decoding keeps a KV cache, which `prefill` fills.

Zoology's MHA is the same attention with options this project's default leaves off: biases on the QKV
and output projections (`bias`), dropout on the attention weights while training (`dropout`), and no
rotary (`rotary=False`: Zoology's figure-2 attention gets its positions from learned absolute embeddings
added to the tokens, models.lm; its Based-figure-2 attention has none but the convolution before it)."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import rotary

Tensor = torch.Tensor


class Attention(nn.Module):
    def __init__(self, d_model: int, num_heads: int = 1, head_dim: int | None = None, bias: bool = False,
                 dropout: float = 0.0, rotary: bool = True, **_):
        super().__init__()
        self.d_model, self.num_heads = d_model, num_heads
        self.head_dim = head_dim or d_model // num_heads
        self.dropout, self.rotary = dropout, rotary
        inner = num_heads * self.head_dim
        self.qkv = nn.Linear(d_model, 3 * inner, bias=bias)
        self.out = nn.Linear(inner, d_model, bias=bias)

    def _rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        return rotary(x, pos) if self.rotary else x

    def _heads(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        return q, k, v  # each (..., H, D)

    def forward(self, x: Tensor) -> Tuple[Tensor, None]:
        return self.prefill(x)[0], None

    def prefill(self, x: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The parallel form over a prompt, plus its KV cache (keys already rotated, as `step` keeps them)."""
        B, T, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self._heads(x))  # (B, H, T, D)
        pos = torch.arange(T, device=x.device)
        k = self._rotate(k, pos)
        o = F.scaled_dot_product_attention(self._rotate(q, pos), k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).flatten(2)), {"k": k, "v": v, "len": T}

    def init_state(self, batch: int, device, dtype) -> Dict[str, object]:
        empty = torch.zeros(batch, self.num_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone(), "len": 0}

    def step(self, x: Tensor, state: Dict[str, object]) -> Tuple[Tensor, Dict[str, object]]:
        """The cache is a buffer with room to spare, filled up to `len`: a token writes one slot instead of
        copying the whole cache (which would double the per-token traffic). Slots past `len` are never
        read, so the state passed in stays valid."""
        q, k, v = (t[:, :, None] for t in self._heads(x))  # (B, H, 1, D)
        n = state["len"]
        k_buf, v_buf = state["k"], state["v"]
        if n == k_buf.shape[2]:  # full: double the room
            B, H, _, D = k_buf.shape
            grow = lambda buf: torch.cat([buf[:, :, :n], buf.new_empty(B, H, max(n, 64), D)], 2)
            k_buf, v_buf = grow(k_buf), grow(v_buf)
        pos = torch.tensor([n], device=x.device)
        k_buf[:, :, n:n + 1] = self._rotate(k, pos)
        v_buf[:, :, n:n + 1] = v
        o = F.scaled_dot_product_attention(self._rotate(q, pos), k_buf[:, :, :n + 1], v_buf[:, :, :n + 1])
        return self.out(o[:, :, 0].flatten(1)), {"k": k_buf, "v": v_buf, "len": n + 1}

    def state_size(self, seq_len: int) -> Dict[str, int]:
        # Zoology's convention: keys and values of every position up to the longest sequence.
        n = 2 * self.d_model * seq_len
        return {"total": n, "active": n}
