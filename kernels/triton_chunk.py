"""Triton kernels for the memory recurrence of `reference`: the chunked form (forward and backward) and
the decoding step.

One kernel family covers every algorithm of the reference table through compile-time switches:

    DECAY     0: none, 1: per-head scalar g (B, T, H), 2: per-channel g (B, T, H, K); log space, g <= 0
    DELTA     delta rule u = beta (v - S'^T k), or the plain write u = beta v
    HAS_BETA  beta given (otherwise 1)
    NORM      L2-normalise q and k inside the kernels (and differentiate through it)

Everything runs as packed variable-length segments: (B, T, ...) without cu_seqlens is viewed as B
segments of length T of one (1, B*T, ...) batch. A chunk is BT consecutive tokens of one segment; the
last chunk of a segment is partial (masked rows; a padded row has q = k = v = 0, beta = 0, g = 0). Per
chunk, with G the cumulative log decay inside the chunk (G_last at its last token) and h the state at
the chunk start:

  forward   prep  G = cumsum(g); for the delta rule the WY representation:
                  L = strict_lower(beta_t k_t.k_s e^{G_t - G_s}), A = (I + L)^-1,
                  W = A (beta k e^G), U = A (beta v)
            h     sequential over chunks, one program per (segment, head, V block): store h,
                  v_new = U - W h (delta) or beta v, then h <- e^{G_last} h + (k e^{G_last - G})^T v_new
            o     o = (q e^G) h + M v_new,  M = lower(q_t.k_s e^{G_t - G_s})  (diagonal included)
  backward  dh    reverse over chunks: dv_new = M^T do + (k e^{G_last - G}) dh_next,
                  dh <- e^{G_last} dh_next + (q e^G)^T do - W^T dv_new         (dh_next stored per chunk)
            grad  per chunk: dq, dk, dv, dbeta and dG, whose reverse cumsum inside the chunk is dg

The backward recomputes prep and h from the inputs: only the inputs are saved for it.
All accumulation is fp32; intermediates (G, A, W, U, states, v_new) are stored in fp32; outputs take the
dtype of v (o), of the inputs (gradients) and fp32 (states). Dots take fp32 operands (three-pass tf32
for fp32 inputs, tf32 otherwise), so no dot accumulator is ever cast to 16 bits and transposed into
another dot (the Hopper miscompile of ../shared/reference/gpu.md).

The per-channel pairwise terms sum_k a_tk b_sk e^{G_tk - G_sk} do not factor into one matrix product
without risking overflow, so they are formed one key column at a time (exact, O(BT^2 K) elementwise):
correct everywhere, to be replaced by sub-chunked products when tuning on the GPU.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import reference as _reference

Tensor = torch.Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
EPS = tl.constexpr(1e-6)  # the eps of reference.l2norm


def _interpreter_loop_bounds_fix() -> None:
    """Triton 3.6's interpreter holds every scalar as a 1-element numpy array and turns it into a loop
    bound with int(array), which numpy >= 2.4 refuses for arrays of dimension 1: loops with a runtime
    bound (`for i in range(0, n)`, the GPU-friendly form) fail there. Read the one element instead."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_loop_bounds_fix", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._loop_bounds_fix = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _interpreter_loop_bounds_fix()


# ----------------------------------------------------------------------------------------------------
# Small jit helpers
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _chunk_rows(cu, cidx, i_t, BT: tl.constexpr):
    """Token indices of global chunk i_t, which rows are inside its segment, and its last real token."""
    i_n = tl.load(cidx + 2 * i_t)
    i_c = tl.load(cidx + 2 * i_t + 1)
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    t0 = bos + i_c * BT
    offs = t0 + tl.arange(0, BT)
    return offs, offs < eos, tl.minimum(t0 + BT, eos) - 1


@triton.jit
def _load_tile(ptr, offs, valid, col0, stride, D: tl.constexpr, BD: tl.constexpr):
    """Rows `offs` and columns col0 + [0, BD) (of D) of a row-major array with row stride `stride`, fp32."""
    cols = col0 + tl.arange(0, BD)
    mask = valid[:, None] & (cols[None, :] < D)
    return tl.load(ptr + offs[:, None] * stride + cols[None, :], mask=mask, other=0.).to(tl.float32)


@triton.jit
def _store_tile(ptr, x, offs, valid, col0, stride, D: tl.constexpr, BD: tl.constexpr):
    cols = col0 + tl.arange(0, BD)
    mask = valid[:, None] & (cols[None, :] < D)
    tl.store(ptr + offs[:, None] * stride + cols[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_qk(ptr, offs, valid, stride, scale, K: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr):
    x = _load_tile(ptr, offs, valid, 0, stride, K, BK)
    if NORM:
        x = x * tl.rsqrt(tl.sum(x * x, 1) + EPS)[:, None]
    return x * scale


@triton.jit
def _l2norm_bwd(x, dy):
    """Gradient wrt x of y = x / sqrt(|x|^2 + eps), rows of a tile."""
    r = tl.rsqrt(tl.sum(x * x, 1) + EPS)[:, None]
    y = x * r
    return r * (dy - y * tl.sum(y * dy, 1)[:, None])


@triton.jit
def _load_beta(beta, offs, valid, H: tl.constexpr, i_h, HAS_BETA: tl.constexpr):
    if HAS_BETA:
        b = tl.load(beta + offs * H + i_h, mask=valid, other=0.).to(tl.float32)
    else:
        b = valid.to(tl.float32)
    return b


@triton.jit
def _load_decay(gc, offs, valid, t_last, i_h, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                DECAY: tl.constexpr):
    """The chunk's cumulative log decay: (BT,) for a scalar decay, (BT, BK) per channel; padded rows get
    G_last, as a zero g there would give. Also G_last: a scalar, or (BK,)."""
    if DECAY == 1:
        G_last = tl.load(gc + t_last * H + i_h)
        G = tl.load(gc + offs * H + i_h, mask=valid, other=0.)
        G = tl.where(valid, G, G_last)
    else:
        cols = tl.arange(0, BK)
        G_last = tl.load(gc + t_last * (H * K) + i_h * K + cols, mask=cols < K, other=0.)
        G = _load_tile(gc + i_h * K, offs, valid, 0, H * K, K, BK)
        G = tl.where(valid[:, None], G, G_last[None, :])
    return G, G_last


@triton.jit
def _exp_rows(G, DECAY: tl.constexpr):
    """e^G, broadcastable against a (BT, BK) tile."""
    if DECAY == 1:
        e = tl.exp(G)[:, None]
    else:
        e = tl.exp(G)
    return e


@triton.jit
def _exp_to_end(G, G_last, valid, DECAY: tl.constexpr):
    """e^(G_last - G) on real rows, 0 on padded ones, broadcastable against (BT, BK)."""
    if DECAY == 1:
        e = tl.where(valid, tl.exp(G_last - G), 0.)[:, None]
    else:
        e = tl.where(valid[:, None], tl.exp(G_last[None, :] - G), 0.)
    return e


@triton.jit
def _exp_last(G_last, DECAY: tl.constexpr):
    """e^G_last, broadcastable against a (BK, BV) state."""
    if DECAY == 1:
        e = tl.exp(G_last)
    else:
        e = tl.exp(G_last)[:, None]
    return e


@triton.jit
def _sum_k(x, DECAY: tl.constexpr):
    """A (BT, BK) decay gradient in the shape of G."""
    if DECAY == 1:
        y = tl.sum(x, 1)
    else:
        y = x
    return y


@triton.jit
def _pair(a, b, G, BT: tl.constexpr, DECAY: tl.constexpr, STRICT: tl.constexpr, PREC: tl.constexpr):
    """P[t, s] = sum_k a_tk b_sk e^{G_t - G_s} for s < t (STRICT) or s <= t, else 0."""
    rows = tl.arange(0, BT)
    if STRICT:
        mask = rows[:, None] > rows[None, :]
    else:
        mask = rows[:, None] >= rows[None, :]
    if DECAY == 2:
        P = tl.zeros([BT, BT], dtype=tl.float32)
        for j in range(BT):
            sel = rows == j
            b_j = tl.sum(tl.where(sel[:, None], b, 0.), 0)
            G_j = tl.sum(tl.where(sel[:, None], G, 0.), 0)
            E = tl.exp(tl.where(rows[:, None] >= j, G - G_j[None, :], 0.))
            col = tl.sum(a * b_j[None, :] * E, 1)
            P = tl.where(rows[None, :] == j, col[:, None], P)
    else:
        P = tl.dot(a, tl.trans(b), input_precision=PREC)
        if DECAY == 1:
            P = P * tl.exp(tl.where(mask, G[:, None] - G[None, :], 0.))
    return tl.where(mask, P, 0.)


@triton.jit
def _pair_bwd(dP, a, b, G, BT: tl.constexpr, BK: tl.constexpr, DECAY: tl.constexpr, STRICT: tl.constexpr,
              PREC: tl.constexpr):
    """Gradients of sum(dP * _pair(a, b, G)) wrt a, b and G (G's shape; zeros without decay)."""
    rows = tl.arange(0, BT)
    if STRICT:
        mask = rows[:, None] > rows[None, :]
    else:
        mask = rows[:, None] >= rows[None, :]
    dP = tl.where(mask, dP, 0.)
    if DECAY == 2:
        da = tl.zeros([BT, BK], dtype=tl.float32)
        db = tl.zeros([BT, BK], dtype=tl.float32)
        dG = tl.zeros([BT, BK], dtype=tl.float32)
        for j in range(BT):
            sel = rows == j
            b_j = tl.sum(tl.where(sel[:, None], b, 0.), 0)
            G_j = tl.sum(tl.where(sel[:, None], G, 0.), 0)
            E = tl.exp(tl.where(rows[:, None] >= j, G - G_j[None, :], 0.))
            X = tl.sum(tl.where(rows[None, :] == j, dP, 0.), 1)[:, None] * E  # dP[t, j] e^{G_t - G_j}
            da += X * b_j[None, :]
            Y = X * a
            db += tl.where(sel[:, None], tl.sum(Y, 0)[None, :], 0.)
            Z = Y * b_j[None, :]
            dG += Z - tl.where(sel[:, None], tl.sum(Z, 0)[None, :], 0.)
    else:
        if DECAY == 1:
            D = tl.where(mask, tl.exp(tl.where(mask, G[:, None] - G[None, :], 0.)), 0.)
            dPD = dP * D
            Z = dPD * tl.dot(a, tl.trans(b), input_precision=PREC)
            dG = tl.sum(Z, 1) - tl.sum(Z, 0)
        else:
            dPD = dP
            dG = tl.zeros([BT], dtype=tl.float32)
        da = tl.dot(dPD, b, input_precision=PREC)
        db = tl.dot(tl.trans(dPD), a, input_precision=PREC)
    return da, db, dG


@triton.jit
def _unit_lower_inverse(L, BT: tl.constexpr, PREC: tl.constexpr):
    """(I + L)^-1 for a strictly lower triangular L, by doubling diagonal blocks: with X the inverse of
    the diagonal blocks of size s, the blocks of size 2s are [[A, 0], [C, D]]^-1 = X - X C X where C
    holds the entries of L below the s-blocks inside each 2s-block. log2(BT) steps of two products."""
    rows = tl.arange(0, BT)
    X = (rows[:, None] == rows[None, :]).to(tl.float32)
    for lvl in tl.static_range(0, 8):
        if (1 << lvl) < BT:
            in_pair = (rows[:, None] // (2 << lvl)) == (rows[None, :] // (2 << lvl))
            across = (rows[:, None] // (1 << lvl)) != (rows[None, :] // (1 << lvl))
            C = tl.where(in_pair & across, L, 0.)
            X = X - tl.dot(tl.dot(X, C, input_precision=PREC), X, input_precision=PREC)
    return X


# ----------------------------------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _prep_fwd_kernel(k, v, g, beta, gc, Ai, w, u, cu, cidx,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, DECAY: tl.constexpr, HAS_BETA: tl.constexpr, DELTA: tl.constexpr,
                     NORM: tl.constexpr, PREC: tl.constexpr):
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    offs, valid, t_last = _chunk_rows(cu, cidx, i_t, BT)
    G = tl.zeros([BT], dtype=tl.float32)
    if DECAY == 1:
        G = tl.cumsum(tl.load(g + offs * H + i_h, mask=valid, other=0.).to(tl.float32), 0)
        tl.store(gc + offs * H + i_h, G, mask=valid)
    if DECAY == 2:
        G = tl.cumsum(_load_tile(g + i_h * K, offs, valid, 0, H * K, K, BK), 0)
        _store_tile(gc + i_h * K, G, offs, valid, 0, H * K, K, BK)
    if DELTA:
        kk = _load_qk(k + i_h * K, offs, valid, H * K, 1.0, K, BK, NORM)
        b = _load_beta(beta, offs, valid, H, i_h, HAS_BETA)
        L = _pair(kk, kk, G, BT, DECAY, True, PREC) * b[:, None]
        A = _unit_lower_inverse(L, BT, PREC)
        _store_tile(Ai + i_h * BT, A, offs, valid, 0, H * BT, BT, BT)
        kb = kk * b[:, None]
        if DECAY > 0:
            kb = kb * _exp_rows(G, DECAY)
        _store_tile(w + i_h * K, tl.dot(A, kb, input_precision=PREC), offs, valid, 0, H * K, K, BK)
        for i_v in range(tl.cdiv(V, BV)):
            vb = _load_tile(v + i_h * V, offs, valid, i_v * BV, H * V, V, BV) * b[:, None]
            _store_tile(u + i_h * V, tl.dot(A, vb, input_precision=PREC), offs, valid, i_v * BV, H * V, V, BV)


@triton.jit
def _h_fwd_kernel(k, v, beta, gc, w, u, h0, hs, vn, ht, cu, coff,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, DECAY: tl.constexpr, HAS_BETA: tl.constexpr, DELTA: tl.constexpr,
                  NORM: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr):
    """The sequential pass: per (segment, head, V block), the state at every chunk start and v_new."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    c0 = tl.load(coff + i_n).to(tl.int64)
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    hmask = (rk[:, None] < K) & (rv[None, :] < V)
    hoff = rk[:, None] * V + rv[None, :]
    if HAS_H0:
        h = tl.load(h0 + i_nh.to(tl.int64) * (K * V) + hoff, mask=hmask, other=0.).to(tl.float32)
    else:
        h = tl.zeros([BK, BV], dtype=tl.float32)
    for i_c in range(0, tl.cdiv(eos - bos, BT)):
        t0 = bos + i_c * BT
        offs = t0 + tl.arange(0, BT)
        valid = offs < eos
        t_last = tl.minimum(t0 + BT, eos) - 1
        tl.store(hs + ((c0 + i_c) * H + i_h) * (K * V) + hoff, h, mask=hmask)
        if DELTA:
            ww = _load_tile(w + i_h * K, offs, valid, 0, H * K, K, BK)
            b_vn = _load_tile(u + i_h * V, offs, valid, i_v * BV, H * V, V, BV)
            b_vn -= tl.dot(ww, h, input_precision=PREC)
            _store_tile(vn + i_h * V, b_vn, offs, valid, i_v * BV, H * V, V, BV)
        else:
            b_vn = _load_tile(v + i_h * V, offs, valid, i_v * BV, H * V, V, BV)
            if HAS_BETA:
                b_vn = b_vn * _load_beta(beta, offs, valid, H, i_h, HAS_BETA)[:, None]
        kk = _load_qk(k + i_h * K, offs, valid, H * K, 1.0, K, BK, NORM)
        if DECAY > 0:
            G, G_last = _load_decay(gc, offs, valid, t_last, i_h, H, K, BK, DECAY)
            kk = kk * _exp_to_end(G, G_last, valid, DECAY)
            h = h * _exp_last(G_last, DECAY)
        h += tl.dot(tl.trans(kk), b_vn, input_precision=PREC)
    tl.store(ht + i_nh.to(tl.int64) * (K * V) + hoff, h, mask=hmask)


@triton.jit
def _o_fwd_kernel(q, k, v, beta, gc, hs, vn, o, cu, cidx, scale,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, DECAY: tl.constexpr, HAS_BETA: tl.constexpr, DELTA: tl.constexpr,
                  NORM: tl.constexpr, PREC: tl.constexpr):
    i_v, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs, valid, t_last = _chunk_rows(cu, cidx, i_t, BT)
    qq = _load_qk(q + i_h * K, offs, valid, H * K, scale, K, BK, NORM)
    kk = _load_qk(k + i_h * K, offs, valid, H * K, 1.0, K, BK, NORM)
    G = tl.zeros([BT], dtype=tl.float32)
    if DECAY > 0:
        G, G_last = _load_decay(gc, offs, valid, t_last, i_h, H, K, BK, DECAY)
    M = _pair(qq, kk, G, BT, DECAY, False, PREC)
    if DECAY > 0:
        qq = qq * _exp_rows(G, DECAY)
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    h = tl.load(hs + (i_t.to(tl.int64) * H + i_h) * (K * V) + rk[:, None] * V + rv[None, :],
                mask=(rk[:, None] < K) & (rv[None, :] < V), other=0.)
    if DELTA:
        b_vn = _load_tile(vn + i_h * V, offs, valid, i_v * BV, H * V, V, BV)
    else:
        b_vn = _load_tile(v + i_h * V, offs, valid, i_v * BV, H * V, V, BV)
        if HAS_BETA:
            b_vn = b_vn * _load_beta(beta, offs, valid, H, i_h, HAS_BETA)[:, None]
    b_o = tl.dot(qq, h, input_precision=PREC) + tl.dot(M, b_vn, input_precision=PREC)
    _store_tile(o + i_h * V, b_o, offs, valid, i_v * BV, H * V, V, BV)


# ----------------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _dh_bwd_kernel(q, k, gc, w, do, dht, dhs, dvn, dh0, cu, coff, scale,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, DECAY: tl.constexpr, DELTA: tl.constexpr, NORM: tl.constexpr,
                   HAS_DHT: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr):
    """The reverse pass: per chunk, the gradient wrt the state at its end (dhs) and wrt v_new (dvn)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    c0 = tl.load(coff + i_n).to(tl.int64)
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    hmask = (rk[:, None] < K) & (rv[None, :] < V)
    hoff = rk[:, None] * V + rv[None, :]
    if HAS_DHT:
        dh = tl.load(dht + i_nh.to(tl.int64) * (K * V) + hoff, mask=hmask, other=0.).to(tl.float32)
    else:
        dh = tl.zeros([BK, BV], dtype=tl.float32)
    NT = tl.cdiv(eos - bos, BT)
    for i in range(0, NT):
        i_c = NT - 1 - i
        t0 = bos + i_c * BT
        offs = t0 + tl.arange(0, BT)
        valid = offs < eos
        t_last = tl.minimum(t0 + BT, eos) - 1
        tl.store(dhs + ((c0 + i_c) * H + i_h) * (K * V) + hoff, dh, mask=hmask)
        qq = _load_qk(q + i_h * K, offs, valid, H * K, scale, K, BK, NORM)
        kk = _load_qk(k + i_h * K, offs, valid, H * K, 1.0, K, BK, NORM)
        G = tl.zeros([BT], dtype=tl.float32)
        if DECAY > 0:
            G, G_last = _load_decay(gc, offs, valid, t_last, i_h, H, K, BK, DECAY)
        M = _pair(qq, kk, G, BT, DECAY, False, PREC)
        b_do = _load_tile(do + i_h * V, offs, valid, i_v * BV, H * V, V, BV)
        if DECAY > 0:
            kk = kk * _exp_to_end(G, G_last, valid, DECAY)
            qq = qq * _exp_rows(G, DECAY)
        b_dvn = tl.dot(tl.trans(M), b_do, input_precision=PREC) + tl.dot(kk, dh, input_precision=PREC)
        _store_tile(dvn + i_h * V, b_dvn, offs, valid, i_v * BV, H * V, V, BV)
        if DECAY > 0:
            dh = dh * _exp_last(G_last, DECAY)
        dh += tl.dot(tl.trans(qq), b_do, input_precision=PREC)
        if DELTA:
            ww = _load_tile(w + i_h * K, offs, valid, 0, H * K, K, BK)
            dh -= tl.dot(tl.trans(ww), b_dvn, input_precision=PREC)
    if HAS_H0:
        tl.store(dh0 + i_nh.to(tl.int64) * (K * V) + hoff, dh, mask=hmask)


@triton.jit
def _grad_bwd_kernel(q, k, v, beta, gc, Ai, w, u, hs, vn, do, dhs, dvn, dq, dk, dv, dbeta, dg, cu, cidx,
                     scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, HAS_BETA: tl.constexpr,
                     DELTA: tl.constexpr, NORM: tl.constexpr, PREC: tl.constexpr):
    """Per chunk: dq, dk, dv, dbeta, dg from the states (hs), their gradients (dhs) and dv_new (dvn)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    offs, valid, t_last = _chunk_rows(cu, cidx, i_t, BT)
    rows = tl.arange(0, BT)
    rk = tl.arange(0, BK)
    qq = _load_qk(q + i_h * K, offs, valid, H * K, scale, K, BK, NORM)
    kk = _load_qk(k + i_h * K, offs, valid, H * K, 1.0, K, BK, NORM)
    b = _load_beta(beta, offs, valid, H, i_h, HAS_BETA)
    G = tl.zeros([BT], dtype=tl.float32)
    if DECAY > 0:
        G, G_last = _load_decay(gc, offs, valid, t_last, i_h, H, K, BK, DECAY)
    if DELTA:
        A = _load_tile(Ai + i_h * BT, offs, valid, 0, H * BT, BT, BT)
    hbase = (i_t.to(tl.int64) * H + i_h) * (K * V)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)  # do h^T
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)  # v_new dh_next^T
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)  # -dv_new h^T: the gradient wrt W
    dM = tl.zeros([BT, BT], dtype=tl.float32)    # do v_new^T
    dL = tl.zeros([BT, BT], dtype=tl.float32)    # the gradient wrt L, from U
    db = tl.zeros([BT], dtype=tl.float32)
    hdh = tl.zeros([BK], dtype=tl.float32)       # sum_v h dh_next: the gradient of e^{G_last}
    for i_v in range(tl.cdiv(V, BV)):
        rv = i_v * BV + tl.arange(0, BV)
        hmask = (rk[:, None] < K) & (rv[None, :] < V)
        h = tl.load(hs + hbase + rk[:, None] * V + rv[None, :], mask=hmask, other=0.)
        dhn = tl.load(dhs + hbase + rk[:, None] * V + rv[None, :], mask=hmask, other=0.)
        b_do = _load_tile(do + i_h * V, offs, valid, i_v * BV, H * V, V, BV)
        b_dvn = _load_tile(dvn + i_h * V, offs, valid, i_v * BV, H * V, V, BV)
        b_v = _load_tile(v + i_h * V, offs, valid, i_v * BV, H * V, V, BV)
        if DELTA:
            b_vn = _load_tile(vn + i_h * V, offs, valid, i_v * BV, H * V, V, BV)
        else:
            b_vn = b_v * b[:, None]
        b_dq += tl.dot(b_do, tl.trans(h), input_precision=PREC)
        dM += tl.dot(b_do, tl.trans(b_vn), input_precision=PREC)
        b_dk += tl.dot(b_vn, tl.trans(dhn), input_precision=PREC)
        hdh += tl.sum(h * dhn, 1)
        if DELTA:
            b_dw -= tl.dot(b_dvn, tl.trans(h), input_precision=PREC)
            dU = tl.dot(tl.trans(A), b_dvn, input_precision=PREC)  # gradient wrt beta v
            b_dv = dU * b[:, None]
            db += tl.sum(b_v * dU, 1)
            b_u = _load_tile(u + i_h * V, offs, valid, i_v * BV, H * V, V, BV)
            dL -= tl.dot(dU, tl.trans(b_u), input_precision=PREC)
        else:
            b_dv = b_dvn * b[:, None]
            db += tl.sum(b_v * b_dvn, 1)
        _store_tile(dv + i_h * V, b_dv, offs, valid, i_v * BV, H * V, V, BV)

    # Across chunks: (q e^G) h and (k e^{G_last - G})^T v_new, and e^{G_last} h.
    if DECAY > 0:
        b_dq = b_dq * _exp_rows(G, DECAY)
        b_dk = b_dk * _exp_to_end(G, G_last, valid, DECAY)
        dG = _sum_k(qq * b_dq - kk * b_dk, DECAY)
        if DECAY == 1:
            dG_last = tl.sum(tl.sum(kk * b_dk, 1), 0) + tl.sum(hdh, 0) * tl.exp(G_last)
        else:
            dG_last = tl.sum(kk * b_dk, 0) + hdh * tl.exp(G_last)
    # Inside the chunk: M = lower(q k^T e^{G_t - G_s}).
    da, dbk, dGp = _pair_bwd(dM, qq, kk, G, BT, BK, DECAY, False, PREC)
    b_dq += da
    b_dk += dbk
    if DELTA:
        # W = A (beta k e^G), U = A (beta v), A = (I + L)^-1: dL = -(A^T dW) W^T - (A^T dU) U^T.
        dWy = tl.dot(tl.trans(A), b_dw, input_precision=PREC)
        ww = _load_tile(w + i_h * K, offs, valid, 0, H * K, K, BK)
        dL -= tl.dot(dWy, tl.trans(ww), input_precision=PREC)
        kg = kk
        bg = b[:, None]
        if DECAY > 0:
            eg = _exp_rows(G, DECAY)
            kg = kk * eg
            bg = bg * eg
        b_dk += dWy * bg
        db += tl.sum(kg * dWy, 1)
        # L = beta_t pair_strict(k, k)
        dL = tl.where(rows[:, None] > rows[None, :], dL, 0.)
        db += tl.sum(dL * _pair(kk, kk, G, BT, DECAY, True, PREC), 1)
        da2, dbk2, dG2 = _pair_bwd(dL * b[:, None], kk, kk, G, BT, BK, DECAY, True, PREC)
        b_dk += da2 + dbk2
    if DECAY > 0:
        dG += dGp
        if DELTA:
            dG += _sum_k(kg * dWy * b[:, None], DECAY) + dG2
        if DECAY == 1:
            b_dg = tl.cumsum(dG, 0, reverse=True) + dG_last
            tl.store(dg + offs * H + i_h, b_dg.to(dg.dtype.element_ty), mask=valid)
        else:
            b_dg = tl.cumsum(dG, 0, reverse=True) + dG_last[None, :]
            _store_tile(dg + i_h * K, b_dg, offs, valid, 0, H * K, K, BK)
    if HAS_BETA:
        tl.store(dbeta + offs * H + i_h, db.to(dbeta.dtype.element_ty), mask=valid)
    b_dq = b_dq * scale
    if NORM:
        b_dq = _l2norm_bwd(_load_tile(q + i_h * K, offs, valid, 0, H * K, K, BK), b_dq)
        b_dk = _l2norm_bwd(_load_tile(k + i_h * K, offs, valid, 0, H * K, K, BK), b_dk)
    _store_tile(dq + i_h * K, b_dq, offs, valid, 0, H * K, K, BK)
    _store_tile(dk + i_h * K, b_dk, offs, valid, 0, H * K, K, BK)


# ----------------------------------------------------------------------------------------------------
# Decoding step
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _step_kernel(q, k, v, g, beta, s, o, s_new, scale,
                 K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
                 HAS_BETA: tl.constexpr, DELTA: tl.constexpr, NORM: tl.constexpr):
    """One token for one (batch, head) and a V block of the state."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh = i_bh.to(tl.int64)
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    smask = mk[:, None] & mv[None, :]
    soff = i_bh * (K * V) + rk[:, None] * V + rv[None, :]
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


# ----------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------

def _config(K: int, V: int, chunk_size: int) -> dict:
    """Fixed block sizes (the interpreter cannot autotune): K in one block, V split in blocks of BV.

    The chunk size is a hint (the results do not depend on it): a power of 2 from 16 (tl.dot's least
    size) to 64. The gradient kernel holds five (BT, BK) fp32 tiles besides its V block, which overflows shared memory
    on Hopper for BT = 64 and K = 128: the chunk shrinks with the head dim until that kernel is split over
    K blocks. No software pipelining yet (to tune on the GPU)."""
    BK = max(16, triton.next_power_of_2(K))
    if BK > 256:
        raise NotImplementedError(f"head dim K={K}: the kernels hold a whole key row, K <= 256")
    BT = min(max(16, triton.next_power_of_2(chunk_size)), {16: 64, 32: 64, 64: 64, 128: 32, 256: 16}[BK])
    BV = max(16, min(triton.next_power_of_2(V), 64 if BK <= 128 else 32))
    return dict(BT=BT, BK=BK, BV=BV, BV_grad=min(BV, 32 if BK >= 128 else 64), num_warps=4, num_stages=1)


def _chunk_layout(cu: Tensor, BT: int) -> Tuple[Tensor, Tensor, int]:
    """For packed segments: (chunk index (NT, 2) int32 of (segment, chunk in segment), chunk offset of
    every segment (N + 1) int32, NT). One host sync: the grid size needs NT."""
    lens = (cu[1:] - cu[:-1]).cpu().long()
    nt = (lens + BT - 1) // BT
    coff = torch.cat([nt.new_zeros(1), nt.cumsum(0)])
    NT = int(coff[-1])
    seg = torch.repeat_interleave(torch.arange(len(nt)), nt)
    cidx = torch.stack([seg, torch.arange(NT) - coff[seg]], 1)
    return cidx.to(cu.device, torch.int32).contiguous(), coff.to(cu.device, torch.int32), NT


class _Plan:
    """Shapes, switches and block sizes of one call, shared by forward and backward."""

    def __init__(self, q, k, v, g, beta, delta, scale, cu_seqlens, normalize_qk, chunk_size):
        B, T, H, K = q.shape
        V = v.shape[-1]
        cfg = _config(K, V, chunk_size)
        self.B, self.T, self.H, self.K, self.V, self.BT = B, T, H, K, V, cfg["BT"]
        if cu_seqlens is None:
            cu_seqlens = torch.arange(B + 1, device=q.device, dtype=torch.int32) * T
        self.cu = cu_seqlens.to(q.device, torch.int32).contiguous()
        self.N = len(self.cu) - 1
        self.cidx, self.coff, self.NT = _chunk_layout(self.cu, self.BT)
        self.decay = 0 if g is None else (2 if g.dim() == 4 else 1)
        self.has_beta, self.delta, self.norm = beta is not None, bool(delta), bool(normalize_qk)
        self.scale = float(K ** -0.5 if scale is None else scale)
        # fp32 inputs: three-pass tf32 products, about fp32-accurate ("ieee" unrolls into FMA code that
        # takes minutes to compile); 16-bit inputs: one-pass tf32 on fp32 operands.
        self.prec = "tf32x3" if all(x.dtype == torch.float32 for x in (q, k, v)) else "tf32"
        self.BK, self.BV, self.BV_grad = cfg["BK"], cfg["BV"], cfg["BV_grad"]
        self.launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        self.NV = triton.cdiv(V, self.BV)

    def switches(self):
        return dict(DECAY=self.decay, DELTA=self.delta, NORM=self.norm, PREC=self.prec)

    def flat(self, x):
        """(B, T, H, ...) -> (B*T, H, ...) contiguous; None stays None."""
        return None if x is None else x.reshape((self.B * self.T,) + tuple(x.shape[2:])).contiguous()


def _forward_states(p: _Plan, k, v, g, beta, h0):
    """prep and the sequential pass: (G, A, W, U, per-chunk states, v_new, final state), all fp32."""
    TT, H, K, V, BT = p.B * p.T, p.H, p.K, p.V, p.BT
    dev, f32 = k.device, torch.float32
    gc = torch.empty((TT, H) + ((K,) if p.decay == 2 else ()), device=dev, dtype=f32) if p.decay else None
    Ai = torch.empty(TT, H, BT, device=dev, dtype=f32) if p.delta else None
    w = torch.empty(TT, H, K, device=dev, dtype=f32) if p.delta else None
    u = torch.empty(TT, H, V, device=dev, dtype=f32) if p.delta else None
    vn = torch.empty(TT, H, V, device=dev, dtype=f32) if p.delta else None
    hs = torch.empty(p.NT, H, K, V, device=dev, dtype=f32)
    ht = torch.empty(p.N, H, K, V, device=dev, dtype=f32)
    x = k  # stands in for pointers a switch leaves unused
    meta = dict(H=H, K=K, V=V, BT=BT, BK=p.BK, BV=p.BV, HAS_BETA=p.has_beta, **p.switches())
    if p.NT and (p.decay or p.delta):
        _prep_fwd_kernel[(p.NT, H)](k, v, _or(g, x), _or(beta, x), _or(gc, x), _or(Ai, x), _or(w, x),
                                    _or(u, x), p.cu, p.cidx, **p.launch, **meta)
    _h_fwd_kernel[(p.NV, p.N * H)](k, v, _or(beta, x), _or(gc, x), _or(w, x), _or(u, x), _or(h0, x), hs,
                                   _or(vn, x), ht, p.cu, p.coff, HAS_H0=h0 is not None,
                                   **p.launch, **meta)
    return gc, Ai, w, u, hs, vn, ht


def _or(t, default):
    return default if t is None else t


class ChunkMemoryFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, cu_seqlens, scale, delta, normalize_qk, chunk_size):
        p = _Plan(q, k, v, g, beta, delta, scale, cu_seqlens, normalize_qk, chunk_size)
        fq, fk, fv, fg, fb = (p.flat(x) for x in (q, k, v, g, beta))
        h0 = None if initial_state is None else initial_state.contiguous()
        gc, Ai, w, u, hs, vn, ht = _forward_states(p, fk, fv, fg, fb, h0)
        o = torch.empty_like(fv)
        if p.NT:
            _o_fwd_kernel[(p.NV, p.NT, p.H)](fq, fk, fv, _or(fb, fk), _or(gc, fk), hs, _or(vn, fk), o, p.cu,
                                             p.cidx, p.scale, H=p.H, K=p.K, V=p.V, BT=p.BT, BK=p.BK, BV=p.BV,
                                             HAS_BETA=p.has_beta, **p.launch, **p.switches())
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        ctx.plan = p
        ctx.set_materialize_grads(False)  # an unused final state comes back as None: skip its gradient
        return o.view(v.shape), ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, initial_state = ctx.saved_tensors
        p = ctx.plan
        fq, fk, fv, fg, fb = (p.flat(x) for x in (q, k, v, g, beta))
        h0 = None if initial_state is None else initial_state.contiguous()
        gc, Ai, w, u, hs, vn, _ = _forward_states(p, fk, fv, fg, fb, h0)
        do = torch.zeros_like(fv) if do is None else p.flat(do)
        dht = None if dht is None else dht.contiguous()
        H, K, V = p.H, p.K, p.V
        dhs = torch.empty_like(hs)
        dvn = torch.empty(fv.shape, device=fv.device, dtype=torch.float32)
        dh0 = torch.empty(p.N, H, K, V, device=fv.device, dtype=torch.float32) if h0 is not None else None
        x = fk
        meta = dict(H=H, K=K, V=V, BT=p.BT, BK=p.BK, **p.switches())
        _dh_bwd_kernel[(p.NV, p.N * H)](fq, fk, _or(gc, x), _or(w, x), do, _or(dht, x), dhs, dvn, _or(dh0, x),
                                        p.cu, p.coff, p.scale, HAS_DHT=dht is not None,
                                        HAS_H0=h0 is not None, BV=p.BV, **p.launch, **meta)
        dq, dk, dv = torch.empty_like(fq), torch.empty_like(fk), torch.empty_like(fv)
        dg = torch.empty_like(fg) if fg is not None else None
        db = torch.empty_like(fb) if fb is not None else None
        if p.NT:
            _grad_bwd_kernel[(p.NT, H)](fq, fk, fv, _or(fb, x), _or(gc, x), _or(Ai, x), _or(w, x), _or(u, x),
                                        hs, _or(vn, x), do, dhs, dvn, dq, dk, dv, _or(db, x), _or(dg, x),
                                        p.cu, p.cidx, p.scale, HAS_BETA=p.has_beta, BV=p.BV_grad,
                                        **p.launch, **meta)
        else:
            for t in (dq, dk, dv, dg, db):
                if t is not None:
                    t.zero_()
        dh0 = None if dh0 is None else dh0.to(initial_state.dtype)
        return (dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), None if dg is None else dg.view(g.shape),
                None if db is None else db.view(beta.shape), dh0, None, None, None, None, None)


def chunk_memory(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None, beta: Optional[Tensor] = None,
                 delta: bool = False, scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                 cu_seqlens: Optional[Tensor] = None, normalize_qk: bool = False,
                 chunk_size: int = 64) -> Tuple[Tensor, Tensor]:
    """The chunked memory recurrence on Triton: the signature and results of `reference.chunked`.

    Returns (o (B, T, H, V) in v's dtype, final state (N, H, K, V) float32); differentiable wrt q, k, v,
    g, beta and initial_state. chunk_size is a hint: see `_config`.
    """
    _reference._check(q, k, v, g, beta, cu_seqlens, initial_state)
    return ChunkMemoryFunction.apply(q, k, v, g, beta, initial_state, cu_seqlens, scale, delta, normalize_qk,
                                     chunk_size)


def step_memory(q: Tensor, k: Tensor, v: Tensor, state: Tensor, g: Optional[Tensor] = None,
                beta: Optional[Tensor] = None, delta: bool = False, scale: Optional[float] = None,
                normalize_qk: bool = False) -> Tuple[Tensor, Tensor]:
    """One decoding step on Triton, as `reference.step`: q, k (B, H, K), v (B, H, V), g (B, H) or
    (B, H, K), beta (B, H), state (B, H, K, V). Returns (o (B, H, V) in q's dtype, new state in the state's
    dtype). Not differentiable (decoding only)."""
    B, H, K = q.shape
    V = v.shape[-1]
    if state.shape != (B, H, K, V):
        raise ValueError(f"state must be ({B}, {H}, {K}, {V}), got {tuple(state.shape)}")
    decay = 0 if g is None else (2 if g.dim() == 3 else 1)
    cfg = _config(K, V, 64)
    q, k, v, state = (x.contiguous() for x in (q, k, v, state))
    g = q if g is None else g.contiguous()
    beta_ = q if beta is None else beta.contiguous()
    o = torch.empty(B, H, V, device=q.device, dtype=q.dtype)
    s_new = torch.empty_like(state)
    scale = float(K ** -0.5 if scale is None else scale)
    _step_kernel[(triton.cdiv(V, cfg["BV"]), B * H)](
        q, k, v, g, beta_, state, o, s_new, scale, K=K, V=V, BK=cfg["BK"], BV=cfg["BV"], DECAY=decay,
        HAS_BETA=beta is not None, DELTA=bool(delta), NORM=bool(normalize_qk), num_warps=cfg["num_warps"])
    return o, s_new


__all__ = ["chunk_memory", "step_memory", "ChunkMemoryFunction"]
