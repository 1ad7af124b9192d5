"""Based's linear attention (arXiv 2402.18668; Zoology's `Based`, zoology/mixers/based.py with its `TaylorExp`
feature map, zoology/mixers/feature_maps/taylor.py).

Per head, q and k are projected to `feature_dim` F channels (16 in the Based paper) and mapped to
1 + F + F^2 features by the second-order Taylor expansion of exp(q.k / sqrt(F)):

    phi(x) = [1, x / F^(1/4), vec(x x^T) / sqrt(2 F)]  so that  phi(q).phi(k) = 1 + s + s^2 / 2, s = q.k / sqrt(F)

The output is causal linear attention normalised by its own weights, as Zoology computes it:

    y_t = sum_{s<=t} (phi(q_t).phi(k_s)) v_s / (sum_{s<=t} phi(q_t).phi(k_s) + eps),   eps = 1e-12

then one output projection. The weights 1 + s + s^2/2 are at least 1/2, so the denominator never
vanishes. v has head_dim channels per head (d_model / num_heads); Zoology's figure-2 models use one head
and no rotary positions (nor does this). The projections have no bias; there is no output norm or gate.
In Zoology's Based figure-2 models this layer follows a BaseConv layer (kernel 3) in a two-layer hybrid
(`pattern: [base_conv, based]`); the sliding window of the Based paper's language models is a layer of
its own there (`sliding_window`), not part of this mixer.

The sums run on the shared core (`kernels.chunk`: plain linear attention, no decay and no delta rule, on
the feature-mapped q and k, scale 1), with a column of ones appended to v: the core's output then carries
the denominator as its last channel, and its state carries the running sum of phi(k) beside the sum of
phi(k) v^T. One call computes both with the same chunking and rounding, reads phi(q) and phi(k) once,
and `step`, `prefill` and the Triton kernels need nothing of their own for the normaliser.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn

from .. import kernels
from .layers import upcast

Tensor = torch.Tensor


def taylor_features(x: Tensor) -> Tensor:
    """(..., F) -> (..., 1 + F + F^2): phi(x) = [1, x / F^(1/4), vec(x x^T) / sqrt(2 F)]."""
    f = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2)
    return torch.cat([torch.ones_like(x[..., :1]), x * f ** -0.25, outer * (2 * f) ** -0.5], -1)


class Based(nn.Module):
    def __init__(self, d_model: int, num_heads: int = 1, head_dim: int | None = None, feature_dim: int = 16,
                 chunk_size: int = 64, eps: float = 1e-12, **_):
        super().__init__()
        self.d_model, self.H, self.F = d_model, num_heads, feature_dim
        self.V = head_dim or d_model // num_heads
        self.K = 1 + feature_dim + feature_dim ** 2  # the core's key dim: phi's features
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be at least 1, got {feature_dim}")
        if self.K > kernels.MAX_HEAD_DIM:
            raise ValueError(f"Based's 1 + F + F^2 = {self.K} features (feature_dim F = {feature_dim}) exceed the "
                             f"{kernels.MAX_HEAD_DIM} that the Triton kernels take")
        self.chunk_size, self.eps = chunk_size, eps
        H, F, V = num_heads, feature_dim, self.V
        self.q = nn.Linear(d_model, H * F, bias=False)
        self.k = nn.Linear(d_model, H * F, bias=False)
        self.v = nn.Linear(d_model, H * V, bias=False)
        self.out = nn.Linear(H * V, d_model, bias=False)

    def _inputs(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """phi(q), phi(k) (..., H, K) and [v, 1] (..., H, V + 1) of tokens x (..., D)."""
        phi = lambda proj: taylor_features(proj(x).unflatten(-1, (self.H, self.F)))
        v = self.v(x).unflatten(-1, (self.H, self.V))
        return phi(self.q), phi(self.k), torch.cat([v, torch.ones_like(v[..., :1])], -1)

    def _finish(self, o: Tensor, x: Tensor) -> Tensor:
        """The core's output (..., H, V + 1): numerator, then denominator; divided in at least fp32."""
        o = upcast(o)
        y = o[..., :self.V] / (o[..., self.V:] + self.eps)
        return self.out(y.to(x.dtype).flatten(-2))

    def forward(self, x: Tensor) -> Tuple[Tensor, None]:
        return self.prefill(x)[0], None

    def prefill(self, x: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The parallel form over a prompt, plus the core's final state (B, H, K, V + 1)."""
        q, k, v = self._inputs(x)
        o, state = kernels.chunk(q, k, v, scale=1.0, chunk_size=self.chunk_size)
        return self._finish(o, x), {"S": state}

    def init_state(self, batch: int, device, dtype=torch.float32) -> Dict[str, Tensor]:
        return {"S": torch.zeros(batch, self.H, self.K, self.V + 1, device=device,
                                 dtype=torch.promote_types(dtype, torch.float32))}

    def step(self, x: Tensor, state: Dict[str, Tensor]) -> Tuple[Tensor, Dict[str, Tensor]]:
        q, k, v = self._inputs(x)  # (B, H, ...)
        o, S = kernels.step(q, k, v, state["S"], scale=1.0)
        return self._finish(o, x), {"S": S}

    def state_size(self, seq_len: int) -> Dict[str, int]:
        # Zoology's count: per head, head_dim + 1 (the normaliser) columns of the features a state needs.
        # x_i x_j and x_j x_i are one feature, so that is 1 + F + F (F + 1) / 2; this implementation keeps
        # all F^2 products (one matrix product), a state of H * (1 + F + F^2) * (head_dim + 1) values.
        features = 1 + self.F + self.F * (self.F + 1) // 2
        n = self.H * (self.V + 1) * features
        return {"total": n, "active": n}
