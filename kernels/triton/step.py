"""The decoding step on Triton: one token through the memory recurrence, for a batch of states or rows of
a state pool updated in place."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .chunk import _config
from .jit import EPS

Tensor = torch.Tensor


@triton.jit
def _step_kernel(q, k, v, g, beta, s, o, s_new, index, scale, H: tl.constexpr,
                 K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
                 HAS_BETA: tl.constexpr, DELTA: tl.constexpr, NORM: tl.constexpr, HAS_INDEX: tl.constexpr):
    """One token for one (batch, head) and a V block of the state. Under HAS_INDEX the state is row
    index[batch] of a pool; the program reads its whole block before it writes it, so s_new may be s."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh = i_bh.to(tl.int64)
    i_s = i_bh
    if HAS_INDEX:
        i_s = tl.load(index + i_bh // H).to(tl.int64) * H + i_bh % H
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    smask = mk[:, None] & mv[None, :]
    soff = i_s * (K * V) + rk[:, None] * V + rv[None, :]
    b_q = tl.load(q + i_bh * K + rk, mask=mk, other=0.).to(tl.float32)
    b_k = tl.load(k + i_bh * K + rk, mask=mk, other=0.).to(tl.float32)
    if NORM:
        b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, 0) + EPS)
        b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, 0) + EPS)
    b_q = b_q * scale
    S = tl.load(s + soff, mask=smask, other=0.).to(tl.float32)
    if DECAY == 1:
        S = S * tl.exp(tl.load(g + i_bh).to(tl.float32))
    if DECAY == 2:
        S = S * tl.exp(tl.load(g + i_bh * K + rk, mask=mk, other=0.).to(tl.float32))[:, None]
    b_u = tl.load(v + i_bh * V + rv, mask=mv, other=0.).to(tl.float32)
    if DELTA:
        b_u = b_u - tl.sum(b_k[:, None] * S, 0)
    if HAS_BETA:
        b_u = b_u * tl.load(beta + i_bh).to(tl.float32)
    S += b_k[:, None] * b_u[None, :]
    tl.store(o + i_bh * V + rv, tl.sum(b_q[:, None] * S, 0).to(o.dtype.element_ty), mask=mv)
    tl.store(s_new + soff, S.to(s_new.dtype.element_ty), mask=smask)


def step(q: Tensor, k: Tensor, v: Tensor, state: Tensor, g: Optional[Tensor] = None,
                beta: Optional[Tensor] = None, delta: bool = False, scale: Optional[float] = None,
                normalize_qk: bool = False, index: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One decoding step on Triton, as `reference.step`: q, k (B, H, K), v (B, H, V), g (B, H) or
    (B, H, K), beta (B, H), state (B, H, K, V). Returns (o (B, H, V) in q's dtype, new state in the state's
    dtype). Not differentiable (decoding only).

    With index (B,) of distinct rows, state is a contiguous pool (N, H, K, V) whose rows index are read
    and written in place (one launch, and no gathered copy of the states: decoding is bound by their
    traffic); the pool is returned."""
    B, H, K = q.shape
    V = v.shape[-1]
    if index is None and state.shape != (B, H, K, V):
        raise ValueError(f"state must be ({B}, {H}, {K}, {V}), got {tuple(state.shape)}")
    if index is not None:
        if state.dim() != 4 or state.shape[1:] != (H, K, V) or index.shape != (B,):
            raise ValueError(f"with index ({B},), state must be a pool (N, {H}, {K}, {V}); got index "
                             f"{tuple(index.shape)}, state {tuple(state.shape)}")
        if not state.is_contiguous():
            raise ValueError("the pool is updated in place and must be contiguous")
    decay = 0 if g is None else (2 if g.dim() == 3 else 1)
    cfg = _config(K, V, 64)
    q, k, v = (x.contiguous() for x in (q, k, v))
    g = q if g is None else g.contiguous()
    beta_ = q if beta is None else beta.contiguous()
    o = torch.empty(B, H, V, device=q.device, dtype=q.dtype)
    if index is None:
        state = state.contiguous()
        s_new = torch.empty_like(state)
    else:
        s_new = state
    scale = float(K ** -0.5 if scale is None else scale)
    _step_kernel[(triton.cdiv(V, cfg["BV_h"]), B * H)](
        q, k, v, g, beta_, state, o, s_new, q if index is None else index.contiguous(), scale, H=H, K=K, V=V,
        BK=cfg["KP"], BV=cfg["BV_h"], DECAY=decay, HAS_BETA=beta is not None, DELTA=bool(delta),
        NORM=bool(normalize_qk), HAS_INDEX=index is not None, num_warps=cfg["warps_h"])
    return o, s_new



__all__ = ["step"]
