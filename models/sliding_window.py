"""Sliding-window attention: softmax attention over the last `window` W positions, the current one
included (position t sees t - W + 1 .. t), with the rotary positions and projections of `Attention`.

Zoology's `SlidingAttn` (zoology/mixers/slide_attn.py) is the same idea with one head of d_model channels,
biased projections and no positions; its mask also lets t see t - W (W + 1 keys). Here W counts every key
a position sees, and heads, projections and positions are those of this project's `Attention`, so the two
attention mixers differ only by the window.

Decoding keeps a ring buffer of W rotated keys and values (slot = position mod W): the state is fixed-size
and `step` writes it in place. `state_size` is Zoology's: 2 * d_model * W, whatever the length.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from .attention import Attention
from .layers import rotary

Tensor = torch.Tensor


def window_mask(T: int, window: int, device=None) -> Tensor:
    """(T, T) boolean: key s is visible from query t iff t - window < s <= t."""
    t = torch.arange(T, device=device)
    diff = t[:, None] - t[None, :]
    return (diff >= 0) & (diff < window)


class SlidingWindowAttention(Attention):
    def __init__(self, d_model: int, num_heads: int = 1, head_dim: int | None = None, window: int = 64, **_):
        super().__init__(d_model, num_heads, head_dim)
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window

    def _parallel(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Output (B, T, D) and the rotated keys and values (B, H, T, D)."""
        T = x.shape[1]
        q, k, v = (t.transpose(1, 2) for t in self._heads(x))
        pos = torch.arange(T, device=x.device)
        k = rotary(k, pos)
        o = F.scaled_dot_product_attention(rotary(q, pos), k, v, attn_mask=window_mask(T, self.window, x.device))
        return self.out(o.transpose(1, 2).flatten(2)), k, v

    def forward(self, x: Tensor) -> Tuple[Tensor, None]:
        return self._parallel(x)[0], None

    def prefill(self, x: Tensor) -> Tuple[Tensor, Dict[str, object]]:
        """The parallel form over a prompt, plus the ring buffer of its last min(T, W) keys and values."""
        y, k, v = self._parallel(x)
        T = x.shape[1]
        state = self.init_state(x.shape[0], x.device, k.dtype)
        last = torch.arange(max(T - self.window, 0), T, device=x.device)
        state["k"][:, :, last % self.window] = k[:, :, last]
        state["v"][:, :, last % self.window] = v[:, :, last]
        state["len"] = T
        return y, state

    def init_state(self, batch: int, device, dtype) -> Dict[str, object]:
        buf = torch.zeros(batch, self.num_heads, self.window, self.head_dim, device=device, dtype=dtype)
        return {"k": buf, "v": buf.clone(), "len": 0}

    def step(self, x: Tensor, state: Dict[str, object]) -> Tuple[Tensor, Dict[str, object]]:
        """Position n = state["len"] writes slot n mod W (over the key of position n - W, the one that
        leaves the window) in place, and attends over the slots filled so far: the first n + 1 while
        n + 1 < W, then all W. Softmax attention is order-free over its keys (their positions are in
        their rotation), so the ring's order does not matter."""
        q, k, v = (t[:, :, None] for t in self._heads(x))  # (B, H, 1, D)
        n, W = state["len"], self.window
        pos = torch.tensor([n], device=x.device)
        k_buf, v_buf = state["k"], state["v"]
        k_buf[:, :, n % W] = rotary(k, pos)[:, :, 0]
        v_buf[:, :, n % W] = v[:, :, 0]
        filled = (torch.arange(W, device=x.device) <= n)[None]  # (1 query, W keys)
        o = F.scaled_dot_product_attention(rotary(q, pos), k_buf, v_buf, attn_mask=filled)
        return self.out(o[:, :, 0].flatten(1)), {"k": k_buf, "v": v_buf, "len": n + 1}

    def state_size(self, seq_len: int) -> Dict[str, int]:
        # Zoology's convention: keys and values of the W positions in the window.
        n = 2 * self.d_model * self.window
        return {"total": n, "active": n}
