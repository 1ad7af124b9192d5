"""Softmax attention (SDPA) with rotary positions; decoding keeps a KV cache, which `prefill` fills."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import rotary

Tensor = torch.Tensor


class Attention(nn.Module):
    def __init__(self, d_model: int, num_heads: int = 1, head_dim: int | None = None, **_):
        super().__init__()
        self.d_model, self.num_heads = d_model, num_heads
        self.head_dim = head_dim or d_model // num_heads
        inner = num_heads * self.head_dim
        self.qkv = nn.Linear(d_model, 3 * inner, bias=False)
        self.out = nn.Linear(inner, d_model, bias=False)

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
        k = rotary(k, pos)
        o = F.scaled_dot_product_attention(rotary(q, pos), k, v, is_causal=True)
        return self.out(o.transpose(1, 2).flatten(2)), {"k": k, "v": v}

    def init_state(self, batch: int, device, dtype) -> Dict[str, Tensor]:
        empty = torch.zeros(batch, self.num_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone()}

    def step(self, x: Tensor, state: Dict[str, Tensor]) -> Tuple[Tensor, Dict[str, Tensor]]:
        q, k, v = (t[:, :, None] for t in self._heads(x))  # (B, H, 1, D)
        pos = torch.tensor([state["k"].shape[2]], device=x.device)
        k_cache = torch.cat([state["k"], rotary(k, pos)], 2)
        v_cache = torch.cat([state["v"], v], 2)
        o = F.scaled_dot_product_attention(rotary(q, pos), k_cache, v_cache)
        return self.out(o[:, :, 0].flatten(1)), {"k": k_cache, "v": v_cache}

    def state_size(self, seq_len: int) -> Dict[str, int]:
        # Zoology's convention: keys and values of every position up to the longest sequence.
        n = 2 * self.d_model * seq_len
        return {"total": n, "active": n}
