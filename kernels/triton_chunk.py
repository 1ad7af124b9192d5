"""Triton kernels for the memory recurrence of `reference`: the chunked form (forward and backward) and
the decoding step.

One kernel family covers every algorithm of the reference table through compile-time switches:

    DECAY     0: none, 1: per-head scalar g (B, T, H), 2: per-channel g (B, T, H, K); log space, g <= 0
    DELTA     delta rule u = beta (v - S'^T k), or the plain write u = beta v
    HAS_BETA  beta given (otherwise 1)
    NORM      L2-normalise q and k inside the kernels (and differentiate through it)

Everything runs as packed variable-length segments: (B, T, ...) without cu_seqlens is viewed as B
segments of length T of one (1, B*T, ...) batch. A chunk is BT = 64 consecutive tokens of one segment
(for every head dim); the last chunk of a segment is partial (masked rows; a padded row has q = k = v = 0,
beta = 0, g = 0). Per chunk, with G the cumulative log decay inside the chunk (G_last at its last token)
and h the state at the chunk start:

  forward   prep  row norms, G = cumsum(g), M = lower(q_t.k_s e^{G_t - G_s}) (diagonal included) and for
                  the delta rule the WY representation: L = strict_lower(beta_t k_t.k_s e^{G_t - G_s}),
                  A = (I + L)^-1, W = A (beta k e^G), U = A (beta v); the BT x BT products summed over
                  blocks of BK keys
            h     sequential over chunks, one program per (segment, head, V block) holding all key rows
                  of its state block: store h, v_new = U - W h (delta) or beta v,
                  h <- e^{G_last} h + (k e^{G_last - G})^T v_new
            o     o = (q e^G) h + M v_new, the first product summed over K blocks
  backward  dh    reverse over chunks: dv_new = M^T do + (k e^{G_last - G}) dh_next,
                  dh <- e^{G_last} dh_next + (q e^G)^T do - W^T dv_new         (dh_next stored per chunk)
            dv    per chunk, sums over V only: dv, dbeta through U, dM = do v_new^T and
                  dL = -(A^T dv_new) v_new^T (the W and U terms of dL collapse since W h = U - v_new)
            dqk   per chunk, one K block at a time: dq, dk, the rest of dbeta, and dg (the reverse cumsum
                  inside the chunk of q dq - k dk over every e^{+-G} factor)

The backward recomputes what the forward did not keep of prep's output and h (A is always kept; see
`_keep`). Where its workspace would be large, it runs over groups of whole segments in turn (`_groups`).
All accumulation is fp32; G, norms, M, A and the gradients wrt M and L are stored in fp32, the states,
W, U, v_new and their gradients in bf16 for 16-bit inputs and fp32 otherwise; outputs take the dtype of
v (o), of the inputs (gradients) and fp32 (states). Dots take fp32 operands (three-pass tf32 for fp32
inputs, tf32 otherwise), so no dot accumulator is ever cast to 16 bits and transposed into another dot
(Triton 3.4 to 3.7.0 miscompile that on Hopper for some block sizes, BK = 64 among them:
flash-linear-attention's issue 640, fixed in Triton 3.7.1).

The per-channel pairwise terms sum_k a_tk b_sk e^{G_tk - G_sk} do not factor into one matrix product
without risking overflow. In sub-chunks of BC = 16 they do: pairs across sub-chunks are products through
the first row of the later sub-chunk (both factors <= 1), pairs inside one are formed one column of each
sub-chunk at a time, exact (`_pair_channel`).
"""
from __future__ import annotations

import copy
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import MAX_HEAD_DIM, reference as _reference
from .triton_env import interpreting

Tensor = torch.Tensor

INTERPRET = interpreting()
# The interpreter's tl.dot multiplies the bit patterns of bf16 operands (triton-lang/triton#11584): there
# `_lp` rounds operands to bf16 but hands them over as fp32, which gives the same products.
_BF16_DOT = tl.constexpr(not INTERPRET)
EPS = tl.constexpr(1e-6)  # the eps of reference.l2norm
FIRST, LAST = tl.constexpr("evict_first"), tl.constexpr("evict_last")  # L2 eviction policies of loads


# ----------------------------------------------------------------------------------------------------
# Small jit helpers
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _chunk_rows(cu, cidx, i_t, BT: tl.constexpr):
    """Token indices of global chunk i_t, which rows are inside its segment, its last real token, and
    whether it has any (the grid is an upper bound on the chunk count: see `_chunk_layout`)."""
    i_n = tl.load(cidx + 2 * i_t)
    i_c = tl.load(cidx + 2 * i_t + 1)
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    t0 = bos + i_c * BT
    offs = t0 + tl.arange(0, BT)
    return offs, offs < eos, tl.minimum(t0 + BT, eos) - 1, t0 < eos


@triton.jit
def _load_tile(ptr, offs, valid, col0, stride, D: tl.constexpr, BD: tl.constexpr, EV: tl.constexpr = None):
    """Rows `offs` and columns col0 + [0, BD) (of D) of a row-major array with row stride `stride`, fp32;
    EV: an eviction policy for L2 (see the dq/dk kernel)."""
    cols = col0 + tl.arange(0, BD)
    mask = valid[:, None] & (cols[None, :] < D)
    return tl.load(ptr + offs[:, None] * stride + cols[None, :], mask=mask, other=0.,
                   eviction_policy=EV or "").to(tl.float32)


@triton.jit
def _store_tile(ptr, x, offs, valid, col0, stride, D: tl.constexpr, BD: tl.constexpr):
    cols = col0 + tl.arange(0, BD)
    mask = valid[:, None] & (cols[None, :] < D)
    tl.store(ptr + offs[:, None] * stride + cols[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_state(ptr, base, row0, col0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                EV: tl.constexpr = None):
    """Rows row0 + [0, BK) and columns col0 + [0, BV) of the (K, V) state at `ptr + base`, as fp32; EV as
    in `_load_tile`."""
    rk = row0 + tl.arange(0, BK)
    rv = col0 + tl.arange(0, BV)
    mask = (rk[:, None] < K) & (rv[None, :] < V)
    return tl.load(ptr + base + rk[:, None] * V + rv[None, :], mask=mask, other=0.,
                   eviction_policy=EV or "").to(tl.float32)


@triton.jit
def _store_state(ptr, x, base, row0, col0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr):
    rk = row0 + tl.arange(0, BK)
    rv = col0 + tl.arange(0, BV)
    mask = (rk[:, None] < K) & (rv[None, :] < V)
    tl.store(ptr + base + rk[:, None] * V + rv[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_factor(rn, offs, valid, i_h, H: tl.constexpr, WHICH: tl.constexpr, NORM: tl.constexpr):
    """What a raw q (WHICH 0) or k (WHICH 1) row is multiplied by: 1/|x| under NORM (stored by the prep
    kernel), else 1; 0 on padded rows."""
    if NORM:
        f = tl.load(rn + (offs * H + i_h) * 2 + WHICH, mask=valid, other=0.)
    else:
        f = valid.to(tl.float32)
    return f


@triton.jit
def _l2norm_bwd(xn, r, dxn):
    """Gradient wrt x of xn = x r, r = 1/sqrt(|x|^2 + eps), from dxn, the gradient wrt xn (whole rows)."""
    return r[:, None] * (dxn - xn * tl.sum(xn * dxn, 1)[:, None])


@triton.jit
def _store_row_grad(ptr, xn, r, dxn, s, offs, valid, col0, stride, K: tl.constexpr, BK: tl.constexpr,
                    NK: tl.constexpr, NORM: tl.constexpr):
    """Stores the K block of q's or k's gradient from dxn, the gradient wrt xn (the normalised rows under
    NORM). A whole row (NK == 1) goes through `_l2norm_bwd` here; else dxn is stored as it is, and s
    (returned) gathers sum(xn dxn) over the blocks for the second pass that finishes the rows."""
    if NORM and NK == 1:
        _store_tile(ptr, _l2norm_bwd(xn, r, dxn), offs, valid, col0, stride, K, BK)
    else:
        if NORM:
            s += tl.sum(xn * dxn, 1)
        _store_tile(ptr, dxn, offs, valid, col0, stride, K, BK)
    return s


@triton.jit
def _load_beta(beta, offs, valid, H: tl.constexpr, i_h, HAS_BETA: tl.constexpr):
    if HAS_BETA:
        b = tl.load(beta + offs * H + i_h, mask=valid, other=0.).to(tl.float32)
    else:
        b = valid.to(tl.float32)
    return b


@triton.jit
def _decay_rows(gc, offs, valid, t_last, i_h, H: tl.constexpr):
    """Scalar decay: the chunk's cumulative log decay G (BT,), padded rows at G_last (as a zero g there
    would give), and G_last."""
    G_last = tl.load(gc + t_last * H + i_h)
    G = tl.load(gc + offs * H + i_h, mask=valid, other=0.)
    return tl.where(valid, G, G_last), G_last


@triton.jit
def _decay_cols(gc, offs, valid, t_last, i_h, col0, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    """Per-channel decay, columns col0 + [0, BK): G (BT, BK) with padded rows at G_last, and G_last (BK,)."""
    cols = col0 + tl.arange(0, BK)
    G_last = tl.load(gc + t_last * (H * K) + i_h * K + cols, mask=cols < K, other=0.)
    G = _load_tile(gc + i_h * K, offs, valid, col0, H * K, K, BK)
    return tl.where(valid[:, None], G, G_last[None, :]), G_last


@triton.jit
def _load_qk_rows(x, rn, offs, valid, i_h, col0, mult, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                  WHICH: tl.constexpr, NORM: tl.constexpr):
    """Rows `offs` (any tokens) of q (WHICH 0) or k (WHICH 1), columns col0 + [0, BK), normalised (NORM)
    and times `mult`."""
    f = _row_factor(rn, offs, valid, i_h, H, WHICH, NORM) * mult
    return _load_tile(x + i_h * K, offs, valid, col0, H * K, K, BK) * f[:, None]


@triton.jit
def _sub_reference(G, i, rows, BC: tl.constexpr):
    """For sub-chunk i > 0 with first row r = i BC: the rows t of sub-chunk i and the rows s < r, with
    e^{G_t - G_r} on the first and e^{G_r - G_s} on the second (zero elsewhere). G falls along the chunk,
    so both are <= 1: their product is e^{G_t - G_s} for every s < r <= t without any overflow."""
    r = i * BC
    G_r = tl.sum(tl.where((rows == r)[:, None], G, 0.), 0)
    in_i = ((rows // BC) == i)[:, None]
    before = (rows < r)[:, None]
    e_t = tl.where(in_i, tl.exp(tl.where(in_i, G - G_r[None, :], 0.)), 0.)
    e_s = tl.where(before, tl.exp(tl.where(before, G_r[None, :] - G, 0.)), 0.)
    return e_t, e_s


@triton.jit
def _pair_channel(a, b, G, bx, gc, rn, offs, t_last, i_h, col0, b_mult, H: tl.constexpr, K: tl.constexpr,
                  BT: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, B_WHICH: tl.constexpr,
                  NORM: tl.constexpr, STRICT: tl.constexpr, PREC: tl.constexpr):
    """P[t, s] = sum_k a_tk b_sk e^{G_tk - G_sk} for s < t (STRICT) or s <= t, else 0, for one K block.

    No single product factors it without overflow; in sub-chunks of BC rows it does: between different
    sub-chunks through the first row of the later one (`_sub_reference`, one product each), and inside a
    sub-chunk one column of every sub-chunk at a time, exact (the exponent is masked to s <= t before
    exp), with the partner rows b_s, G_s read from memory (bx: the raw q or k that b is, b_mult its scale,
    rn the norms, gc the cumulative decay). O(BT BC K) elementwise instead of O(BT^2 K)."""
    rows = tl.arange(0, BT)
    P = tl.zeros([BT, BT], dtype=tl.float32)
    for i in tl.static_range(1, BT // BC):
        e_t, e_s = _sub_reference(G, i, rows, BC)
        P += tl.dot(a * e_t, tl.trans(b * e_s), input_precision=PREC)
    in_sub = rows % BC
    for j in range(BC):
        s_idx = rows - in_sub + j  # column j of the row's own sub-chunk
        s_offs = offs - in_sub + j
        s_valid = s_offs <= t_last
        if STRICT:
            cond = rows > s_idx
        else:
            cond = rows >= s_idx
        b_s = _load_qk_rows(bx, rn, s_offs, s_valid, i_h, col0, b_mult, H, K, BK, B_WHICH, NORM)
        G_s, G_last = _decay_cols(gc, s_offs, s_valid, t_last, i_h, col0, H, K, BK)
        col = tl.sum(a * b_s * tl.exp(tl.where(cond[:, None], G - G_s, 0.)), 1)
        P = tl.where((rows[None, :] == s_idx[:, None]) & cond[:, None], col[:, None], P)
    if STRICT:
        mask = rows[:, None] > rows[None, :]
    else:
        mask = rows[:, None] >= rows[None, :]
    return tl.where(mask, P, 0.)


@triton.jit
def _pair_channel_bwd(dP, dPx, a, b, G, ax, bx, gc, rn, offs, t_last, i_h, col0, a_mult, b_mult,
                      H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr,
                      A_WHICH: tl.constexpr, B_WHICH: tl.constexpr, NORM: tl.constexpr, PREC: tl.constexpr):
    """Gradients wrt a and b of sum(dP * _pair_channel(a, b, G)), dP already masked to the pair's
    triangle and stored at dPx as rows of BT (read back there one element per row, rather than picked
    out of the tile), in the same sub-chunks (ax, a_mult: what a is, as bx, b_mult for b). The gradient
    wrt G is a da - b db (each G_tk multiplies a_tk and divides b_tk)."""
    rows = tl.arange(0, BT)
    da = tl.zeros([BT, BK], dtype=tl.float32)
    db = tl.zeros([BT, BK], dtype=tl.float32)
    for i in tl.static_range(1, BT // BC):
        e_t, e_s = _sub_reference(G, i, rows, BC)
        da += e_t * tl.dot(dP, b * e_s, input_precision=PREC)
        db += e_s * tl.dot(tl.trans(dP), a * e_t, input_precision=PREC)
    in_sub = rows % BC
    for j in range(BC):
        p_idx = rows - in_sub + j  # row j of the row's own sub-chunk: s for da, t for db
        p_offs = offs - in_sub + j
        p_valid = p_offs <= t_last
        G_p, G_last = _decay_cols(gc, p_offs, p_valid, t_last, i_h, col0, H, K, BK)
        # da_t += dP[t, s] e^{G_t - G_s} b_s for s = p(t) <= t
        valid = offs <= t_last
        x = tl.load(dPx + offs * (H * BT) + i_h * BT + p_idx, mask=valid, other=0.)
        b_p = _load_qk_rows(bx, rn, p_offs, p_valid, i_h, col0, b_mult, H, K, BK, B_WHICH, NORM)
        da += x[:, None] * tl.exp(tl.where((rows >= p_idx)[:, None], G - G_p, 0.)) * b_p
        # db_s += dP[t, s] e^{G_t - G_s} a_t for t = p(s) >= s
        y = tl.load(dPx + p_offs * (H * BT) + i_h * BT + rows, mask=p_valid, other=0.)
        a_p = _load_qk_rows(ax, rn, p_offs, p_valid, i_h, col0, a_mult, H, K, BK, A_WHICH, NORM)
        db += y[:, None] * tl.exp(tl.where((p_idx >= rows)[:, None], G_p - G, 0.)) * a_p
    return da, db


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
def _prep_kernel(q, k, v, g, beta, gc, rn, Mqk, Mkk, Ai, w, u, cu, cidx, scale,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, BC: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr, DECAY: tl.constexpr,
                 HAS_BETA: tl.constexpr, DELTA: tl.constexpr, NORM: tl.constexpr, PREC: tl.constexpr,
                 HAVE_A: tl.constexpr, WANT_U: tl.constexpr):
    """Per chunk: row norms, G, M = pair(q, k) and for the delta rule pair_strict(k, k), A, W, U; the
    products over K are summed over K blocks. HAVE_A: A is read from Ai (the forward's), not computed.
    WANT_U: U is computed (only the sequential pass reads it)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    offs, valid, t_last, live = _chunk_rows(cu, cidx, i_t, BT)
    if not live:  # a chunk past the real count: nothing to do
        return
    rows = tl.arange(0, BT)
    if NORM:
        sq = tl.zeros([BT], dtype=tl.float32)
        sk = tl.zeros([BT], dtype=tl.float32)
        for i_k in range(NK):
            x = _load_tile(q + i_h * K, offs, valid, i_k * BK, H * K, K, BK)
            sq += tl.sum(x * x, 1)
            x = _load_tile(k + i_h * K, offs, valid, i_k * BK, H * K, K, BK)
            sk += tl.sum(x * x, 1)
        fq = tl.rsqrt(sq + EPS)
        fk = tl.rsqrt(sk + EPS)
        tl.store(rn + (offs * H + i_h) * 2, fq, mask=valid)
        tl.store(rn + (offs * H + i_h) * 2 + 1, fk, mask=valid)
    else:
        fq = valid.to(tl.float32)
        fk = valid.to(tl.float32)
    fq = fq * scale
    G = tl.zeros([BT], dtype=tl.float32)
    if DECAY == 1:
        G = tl.cumsum(tl.load(g + offs * H + i_h, mask=valid, other=0.).to(tl.float32), 0)
        tl.store(gc + offs * H + i_h, G, mask=valid)
    if DECAY == 2:
        for i_k in range(NK):
            Gb = tl.cumsum(_load_tile(g + i_h * K, offs, valid, i_k * BK, H * K, K, BK), 0)
            _store_tile(gc + i_h * K, Gb, offs, valid, i_k * BK, H * K, K, BK)
        tl.debug_barrier()  # the pairs read partner rows of gc and rn that other threads stored
    Mq = tl.zeros([BT, BT], dtype=tl.float32)
    Mk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(NK):
        qb = _load_tile(q + i_h * K, offs, valid, i_k * BK, H * K, K, BK)
        kb = _load_tile(k + i_h * K, offs, valid, i_k * BK, H * K, K, BK)
        if DECAY == 2:
            Gb, Gb_last = _decay_cols(gc, offs, valid, t_last, i_h, i_k * BK, H, K, BK)
            qb = qb * fq[:, None]
            kb = kb * fk[:, None]
            Mq += _pair_channel(qb, kb, Gb, k, gc, rn, offs, t_last, i_h, i_k * BK, 1.0, H, K, BT, BK, BC, 1,
                                NORM, False, PREC)
            if DELTA:
                Mk += _pair_channel(kb, kb, Gb, k, gc, rn, offs, t_last, i_h, i_k * BK, 1.0, H, K, BT, BK, BC,
                                    1, NORM, True, PREC)
        else:
            Mq += tl.dot(qb, tl.trans(kb), input_precision=PREC)
            if DELTA:
                Mk += tl.dot(kb, tl.trans(kb), input_precision=PREC)
    if DECAY != 2:
        # The row factors (norms, scale) and the scalar decay e^{G_t - G_s} factor out of the K sum.
        Mq = Mq * fq[:, None] * fk[None, :]
        Mk = Mk * fk[:, None] * fk[None, :]
        if DECAY == 1:
            D = tl.exp(tl.where(rows[:, None] >= rows[None, :], G[:, None] - G[None, :], 0.))
            Mq = Mq * D
            Mk = Mk * D
    Mq = tl.where(rows[:, None] >= rows[None, :], Mq, 0.)
    _store_tile(Mqk + i_h * BT, Mq, offs, valid, 0, H * BT, BT, BT)
    if DELTA:
        Mk = tl.where(rows[:, None] > rows[None, :], Mk, 0.)
        _store_tile(Mkk + i_h * BT, Mk, offs, valid, 0, H * BT, BT, BT)
        b = _load_beta(beta, offs, valid, H, i_h, HAS_BETA)
        if HAVE_A:
            A = _load_tile(Ai + i_h * BT, offs, valid, 0, H * BT, BT, BT)
        else:
            A = _unit_lower_inverse(Mk * b[:, None], BT, PREC)
            _store_tile(Ai + i_h * BT, A, offs, valid, 0, H * BT, BT, BT)
        for i_k in range(NK):
            kb = _load_tile(k + i_h * K, offs, valid, i_k * BK, H * K, K, BK) * (fk * b)[:, None]
            if DECAY == 1:
                kb = kb * tl.exp(G)[:, None]
            if DECAY == 2:
                Gb, Gb_last = _decay_cols(gc, offs, valid, t_last, i_h, i_k * BK, H, K, BK)
                kb = kb * tl.exp(Gb)
            _store_tile(w + i_h * K, tl.dot(A, kb, input_precision=PREC), offs, valid, i_k * BK, H * K, K, BK)
        if WANT_U:
            for i_v in range(NV):
                vb = _load_tile(v + i_h * V, offs, valid, i_v * BV, H * V, V, BV) * b[:, None]
                _store_tile(u + i_h * V, tl.dot(A, vb, input_precision=PREC), offs, valid, i_v * BV, H * V, V,
                            BV)


@triton.jit
def _lp(x, DOT16: tl.constexpr):
    """A product operand: bf16 under DOT16 (see `_Plan.dot16`), else as it is."""
    if DOT16:
        y = x.to(tl.bfloat16)
        if not _BF16_DOT:
            y = y.to(tl.float32)
    else:
        y = x
    return y


@triton.jit
def _w_h(w, h, offs, valid, col0, i_h, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
         DOT16: tl.constexpr):
    """One K block's share of W h."""
    ww = _load_tile(w + i_h * K, offs, valid, col0, H * K, K, BK)
    return tl.dot(_lp(ww, DOT16), _lp(h, DOT16), input_precision=PREC)


@triton.jit
def _state_init(ptr, base, row0, col0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                HAS: tl.constexpr):
    if HAS:
        x = _load_state(ptr, base, row0, col0, K, V, BK, BV)
    else:
        x = tl.zeros([BK, BV], dtype=tl.float32)
    return x


@triton.jit
def _states_init(ptr, base, col0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 NK: tl.constexpr, HAS: tl.constexpr):
    """The NK <= 4 (BK, BV) tiles of a state held by one program (see `_h_fwd_kernel`), loaded under HAS;
    the tiles past NK are zeros that the kernels never use, so they cost nothing once compiled."""
    x1 = _state_init(ptr, base, 0, col0, K, V, BK, BV, HAS)
    x2 = _state_init(ptr, base, BK, col0, K, V, BK, BV, HAS and NK > 1)
    x3 = _state_init(ptr, base, 2 * BK, col0, K, V, BK, BV, HAS and NK > 2)
    x4 = _state_init(ptr, base, 3 * BK, col0, K, V, BK, BV, HAS and NK > 3)
    return x1, x2, x3, x4


@triton.jit
def _store_states(ptr, x1, x2, x3, x4, base, col0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, NK: tl.constexpr):
    """Stores the first NK of a state's tiles from `_states_init`."""
    _store_state(ptr, x1, base, 0, col0, K, V, BK, BV)
    if NK > 1:
        _store_state(ptr, x2, base, BK, col0, K, V, BK, BV)
    if NK > 2:
        _store_state(ptr, x3, base, 2 * BK, col0, K, V, BK, BV)
    if NK > 3:
        _store_state(ptr, x4, base, 3 * BK, col0, K, V, BK, BV)


@triton.jit
def _sequential_program(order, cu, coff, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                        BV: tl.constexpr):
    """What a program of the sequential passes works on: its head and segment (taken in `order`), the
    segment's rows [bos, eos) and first chunk c0, its V block's first column and its state's offset."""
    i_v, i_j = tl.program_id(0), tl.program_id(1)
    i_n, i_h = tl.load(order + i_j // H), i_j % H
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    c0 = tl.load(coff + i_n).to(tl.int64)
    base = (i_n * H + i_h).to(tl.int64) * (K * V)
    return i_h, bos, eos, c0, i_v * BV, base


@triton.jit
def _h_step(h, k, gc, f, offs, valid, t_last, i_h, col0, b_vn, eG, H: tl.constexpr, K: tl.constexpr,
            BK: tl.constexpr, DECAY: tl.constexpr, PREC: tl.constexpr, DOT16: tl.constexpr):
    """One K block of h <- e^{G_last} h + (k e^{G_last - G})^T v_new. For DECAY < 2 the row factors are
    already on b_vn and eG = e^{G_last}; per channel, f (the k norms) and the decay go on the k block."""
    kk = _load_tile(k + i_h * K, offs, valid, col0, H * K, K, BK)
    if DECAY == 2:
        G, G_last = _decay_cols(gc, offs, valid, t_last, i_h, col0, H, K, BK)
        kk = kk * (f[:, None] * tl.exp(G_last[None, :] - G))
        h = h * tl.exp(G_last)[:, None]
    if DECAY == 1:
        h = h * eG
    return h + tl.dot(tl.trans(_lp(kk, DOT16)), b_vn, input_precision=PREC)


@triton.jit
def _h_fwd_kernel(k, v, beta, gc, rn, w, u, h0, hs, vn, ht, cu, coff, order,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  NK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, HAS_BETA: tl.constexpr,
                  DELTA: tl.constexpr, NORM: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
                  PREC: tl.constexpr, DOT16: tl.constexpr):
    """The sequential pass: per (segment, head, V block), the state at every chunk start and v_new, and
    under STORE_HT the final state; the segments in `order` (see `_chunk_layout`). Given v_new as v (with
    DELTA and HAS_BETA off) it makes the same states from it, with no W h on the chain of steps.

    W h sums over every key row, so one program holds all of them, as NK <= 4 separate (BK, BV) tiles:
    each product then has a (BK, BT) operand that fits in registers (one (K, BT) operand spills at K=256)."""
    i_h, bos, eos, c0, v0, base = _sequential_program(order, cu, coff, H, K, V, BV)
    h1, h2, h3, h4 = _states_init(h0, base, v0, K, V, BK, BV, NK, HAS_H0)
    for i_c in range(0, tl.cdiv(eos - bos, BT)):
        t0 = bos + i_c * BT
        offs = t0 + tl.arange(0, BT)
        valid = offs < eos
        t_last = tl.minimum(t0 + BT, eos) - 1
        hb = ((c0 + i_c) * H + i_h) * (K * V)
        _store_states(hs, h1, h2, h3, h4, hb, v0, K, V, BK, BV, NK)
        if DELTA:
            b_vn = _load_tile(u + i_h * V, offs, valid, v0, H * V, V, BV)
            b_vn -= _w_h(w, h1, offs, valid, 0, i_h, H, K, BK, PREC, DOT16)
            if NK > 1:
                b_vn -= _w_h(w, h2, offs, valid, BK, i_h, H, K, BK, PREC, DOT16)
            if NK > 2:
                b_vn -= _w_h(w, h3, offs, valid, 2 * BK, i_h, H, K, BK, PREC, DOT16)
            if NK > 3:
                b_vn -= _w_h(w, h4, offs, valid, 3 * BK, i_h, H, K, BK, PREC, DOT16)
            _store_tile(vn + i_h * V, b_vn, offs, valid, v0, H * V, V, BV)
            # The state takes v_new as stored, as the o kernel and the backward read it: a backward in
            # groups forms the states again from the stored v_new, and gets the same ones.
            b_vn = b_vn.to(vn.dtype.element_ty).to(tl.float32)
        else:
            b_vn = _load_tile(v + i_h * V, offs, valid, v0, H * V, V, BV)
            if HAS_BETA:
                b_vn = b_vn * _load_beta(beta, offs, valid, H, i_h, HAS_BETA)[:, None]
        f = _row_factor(rn, offs, valid, i_h, H, 1, NORM)
        eG = 1.
        if DECAY < 2:
            # Row factors (norm, e^{G_last - G}) go on the (BT, BV) side of the products.
            if DECAY == 1:
                G, G_last = _decay_rows(gc, offs, valid, t_last, i_h, H)
                f = f * tl.exp(G_last - G)
                eG = tl.exp(G_last)
            b_vn = b_vn * f[:, None]
        b_vn = _lp(b_vn, DOT16)
        h1 = _h_step(h1, k, gc, f, offs, valid, t_last, i_h, 0, b_vn, eG, H, K, BK, DECAY, PREC, DOT16)
        if NK > 1:
            h2 = _h_step(h2, k, gc, f, offs, valid, t_last, i_h, BK, b_vn, eG, H, K, BK, DECAY, PREC, DOT16)
        if NK > 2:
            h3 = _h_step(h3, k, gc, f, offs, valid, t_last, i_h, 2 * BK, b_vn, eG, H, K, BK, DECAY, PREC, DOT16)
        if NK > 3:
            h4 = _h_step(h4, k, gc, f, offs, valid, t_last, i_h, 3 * BK, b_vn, eG, H, K, BK, DECAY, PREC, DOT16)
    if STORE_HT:
        _store_states(ht, h1, h2, h3, h4, base, v0, K, V, BK, BV, NK)


@triton.jit
def _o_fwd_kernel(q, v, beta, gc, rn, Mqk, hs, vn, o, cu, cidx, scale,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, NK: tl.constexpr, DECAY: tl.constexpr, HAS_BETA: tl.constexpr,
                  DELTA: tl.constexpr, NORM: tl.constexpr, PREC: tl.constexpr, DOT16: tl.constexpr):
    """o = (q e^G) h + M v_new, the first product summed over K blocks."""
    i_v, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs, valid, t_last, live = _chunk_rows(cu, cidx, i_t, BT)
    if not live:  # a chunk past the real count: nothing to do
        return
    hbase = (i_t.to(tl.int64) * H + i_h) * (K * V)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(NK):
        qb = _load_tile(q + i_h * K, offs, valid, i_k * BK, H * K, K, BK)
        if DECAY == 2:
            G, G_last = _decay_cols(gc, offs, valid, t_last, i_h, i_k * BK, H, K, BK)
            qb = qb * tl.exp(G)
        hb = _load_state(hs, hbase, i_k * BK, i_v * BV, K, V, BK, BV)
        acc += tl.dot(_lp(qb, DOT16), _lp(hb, DOT16), input_precision=PREC)
    f = _row_factor(rn, offs, valid, i_h, H, 0, NORM) * scale
    if DECAY == 1:
        G, G_last = _decay_rows(gc, offs, valid, t_last, i_h, H)
        f = f * tl.exp(G)
    M = _load_tile(Mqk + i_h * BT, offs, valid, 0, H * BT, BT, BT)
    if DELTA:
        b_vn = _load_tile(vn + i_h * V, offs, valid, i_v * BV, H * V, V, BV)
    else:
        b_vn = _load_tile(v + i_h * V, offs, valid, i_v * BV, H * V, V, BV)
        if HAS_BETA:
            b_vn = b_vn * _load_beta(beta, offs, valid, H, i_h, HAS_BETA)[:, None]
    b_o = acc * f[:, None] + tl.dot(M, b_vn, input_precision=PREC)
    _store_tile(o + i_h * V, b_o, offs, valid, i_v * BV, H * V, V, BV)


# ----------------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _k_dh(dh, k, gc, fk, offs, valid, t_last, i_h, col0, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
          DECAY: tl.constexpr, PREC: tl.constexpr, DOT16: tl.constexpr):
    """One K block of (k e^{G_last - G}) dh; for DECAY < 2 without the row factors (applied on the sum)."""
    kk = _load_tile(k + i_h * K, offs, valid, col0, H * K, K, BK)
    if DECAY == 2:
        G, G_last = _decay_cols(gc, offs, valid, t_last, i_h, col0, H, K, BK)
        kk = kk * (fk[:, None] * tl.exp(G_last[None, :] - G))
    return tl.dot(_lp(kk, DOT16), _lp(dh, DOT16), input_precision=PREC)


@triton.jit
def _dh_step(dh, q, w, gc, fq, offs, valid, t_last, i_h, col0, b_do, b_dvn, eG, H: tl.constexpr,
             K: tl.constexpr, BK: tl.constexpr, DECAY: tl.constexpr, DELTA: tl.constexpr, PREC: tl.constexpr,
             DOT16: tl.constexpr):
    """One K block of dh <- e^{G_last} dh + (q e^G)^T do - W^T dv_new (for DECAY < 2 the row factors of
    q are already on b_do)."""
    qq = _load_tile(q + i_h * K, offs, valid, col0, H * K, K, BK)
    if DECAY == 2:
        G, G_last = _decay_cols(gc, offs, valid, t_last, i_h, col0, H, K, BK)
        qq = qq * (fq[:, None] * tl.exp(G))
        dh = dh * tl.exp(G_last)[:, None]
    if DECAY == 1:
        dh = dh * eG
    dh += tl.dot(tl.trans(_lp(qq, DOT16)), b_do, input_precision=PREC)
    if DELTA:
        ww = _lp(_load_tile(w + i_h * K, offs, valid, col0, H * K, K, BK), DOT16)
        dh -= tl.dot(tl.trans(ww), b_dvn, input_precision=PREC)
    return dh


@triton.jit
def _dvn_intra_kernel(Mqk, do, dvn, cu, cidx, H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                      BV: tl.constexpr, PREC: tl.constexpr):
    """dv_new's share from inside each chunk, M^T do, into dvn: the reverse pass adds the share through the
    state. Computed apart so that the reverse pass, bound by its chain of steps, loads a (BT, BV) bf16 tile
    per step instead of M (BT x BT, fp32), and fits two pipeline stages in shared memory."""
    i_v, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs, valid, t_last, live = _chunk_rows(cu, cidx, i_t, BT)
    if not live:  # a chunk past the real count: nothing to do
        return
    M = _load_tile(Mqk + i_h * BT, offs, valid, 0, H * BT, BT, BT)
    b_do = _load_tile(do + i_h * V, offs, valid, i_v * BV, H * V, V, BV)
    _store_tile(dvn + i_h * V, tl.dot(tl.trans(M), b_do, input_precision=PREC), offs, valid, i_v * BV, H * V, V, BV)


@triton.jit
def _dh_bwd_kernel(q, k, gc, rn, w, do, dht, dhs, dvn, dh0, cu, coff, order, scale,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   NK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, DELTA: tl.constexpr,
                   NORM: tl.constexpr, HAS_DHT: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr,
                   DOT16: tl.constexpr):
    """The reverse pass: per chunk, the gradient wrt the state at its end (dhs) and wrt v_new (dvn, which
    holds M^T do on entry); the state gradient held as NK <= 4 (BK, BV) tiles as in the forward pass, the
    segments in `order`."""
    i_h, bos, eos, c0, v0, base = _sequential_program(order, cu, coff, H, K, V, BV)
    dh1, dh2, dh3, dh4 = _states_init(dht, base, v0, K, V, BK, BV, NK, HAS_DHT)
    NT = tl.cdiv(eos - bos, BT)
    for i in range(0, NT):
        i_c = NT - 1 - i
        t0 = bos + i_c * BT
        offs = t0 + tl.arange(0, BT)
        valid = offs < eos
        t_last = tl.minimum(t0 + BT, eos) - 1
        hb = ((c0 + i_c) * H + i_h) * (K * V)
        _store_states(dhs, dh1, dh2, dh3, dh4, hb, v0, K, V, BK, BV, NK)
        fq = _row_factor(rn, offs, valid, i_h, H, 0, NORM) * scale
        fk = _row_factor(rn, offs, valid, i_h, H, 1, NORM)
        eG = 1.
        if DECAY == 1:
            G, G_last = _decay_rows(gc, offs, valid, t_last, i_h, H)
            fk = fk * tl.exp(G_last - G)
            fq = fq * tl.exp(G)
            eG = tl.exp(G_last)
        # dv_new = M^T do + (k e^{G_last - G}) dh_next
        x = _k_dh(dh1, k, gc, fk, offs, valid, t_last, i_h, 0, H, K, BK, DECAY, PREC, DOT16)
        if NK > 1:
            x += _k_dh(dh2, k, gc, fk, offs, valid, t_last, i_h, BK, H, K, BK, DECAY, PREC, DOT16)
        if NK > 2:
            x += _k_dh(dh3, k, gc, fk, offs, valid, t_last, i_h, 2 * BK, H, K, BK, DECAY, PREC, DOT16)
        if NK > 3:
            x += _k_dh(dh4, k, gc, fk, offs, valid, t_last, i_h, 3 * BK, H, K, BK, DECAY, PREC, DOT16)
        if DECAY < 2:
            x = x * fk[:, None]
        b_do = _load_tile(do + i_h * V, offs, valid, v0, H * V, V, BV)
        b_dvn = x + _load_tile(dvn + i_h * V, offs, valid, v0, H * V, V, BV)  # + M^T do (`_dvn_intra_kernel`)
        _store_tile(dvn + i_h * V, b_dvn, offs, valid, v0, H * V, V, BV)
        b_dvn = _lp(b_dvn, DOT16)
        if DECAY < 2:
            b_do = b_do * fq[:, None]
        b_do = _lp(b_do, DOT16)
        dh1 = _dh_step(dh1, q, w, gc, fq, offs, valid, t_last, i_h, 0, b_do, b_dvn, eG, H, K, BK, DECAY, DELTA,
                       PREC, DOT16)
        if NK > 1:
            dh2 = _dh_step(dh2, q, w, gc, fq, offs, valid, t_last, i_h, BK, b_do, b_dvn, eG, H, K, BK, DECAY,
                           DELTA, PREC, DOT16)
        if NK > 2:
            dh3 = _dh_step(dh3, q, w, gc, fq, offs, valid, t_last, i_h, 2 * BK, b_do, b_dvn, eG, H, K, BK, DECAY,
                           DELTA, PREC, DOT16)
        if NK > 3:
            dh4 = _dh_step(dh4, q, w, gc, fq, offs, valid, t_last, i_h, 3 * BK, b_do, b_dvn, eG, H, K, BK, DECAY,
                           DELTA, PREC, DOT16)
    if HAS_H0:
        _store_states(dh0, dh1, dh2, dh3, dh4, base, v0, K, V, BK, BV, NK)


@triton.jit
def _dv_bwd_kernel(v, beta, gc, Ai, Mkk, vn, do, dvn, dv, dMs, dLs, dbp, cu, cidx,
                   H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
                   DECAY: tl.constexpr, HAS_BETA: tl.constexpr, DELTA: tl.constexpr, PREC: tl.constexpr):
    """Per chunk, everything that sums over V only: dv, the beta gradient through U, and the gradients
    wrt M (dM = do v_new^T) and wrt L (dL = -(A^T dv_new) v_new^T: with W h = U - v_new the W and U
    terms of dL collapse into one, so no sum over K is needed), stored for the dq/dk kernel; for a
    scalar decay already times e^{G_t - G_s}, which the dq/dk kernel would otherwise form (registers
    are short there)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    offs, valid, t_last, live = _chunk_rows(cu, cidx, i_t, BT)
    if not live:  # a chunk past the real count: nothing to do
        return
    rows = tl.arange(0, BT)
    b = _load_beta(beta, offs, valid, H, i_h, HAS_BETA)
    dM = tl.zeros([BT, BT], dtype=tl.float32)
    dL = tl.zeros([BT, BT], dtype=tl.float32)
    db = tl.zeros([BT], dtype=tl.float32)
    if DELTA:
        A = _load_tile(Ai + i_h * BT, offs, valid, 0, H * BT, BT, BT)
    for i_v in range(NV):
        b_do = _load_tile(do + i_h * V, offs, valid, i_v * BV, H * V, V, BV)
        b_dvn = _load_tile(dvn + i_h * V, offs, valid, i_v * BV, H * V, V, BV)
        b_v = _load_tile(v + i_h * V, offs, valid, i_v * BV, H * V, V, BV)
        if DELTA:
            b_vn = _load_tile(vn + i_h * V, offs, valid, i_v * BV, H * V, V, BV)
        else:
            b_vn = b_v * b[:, None]
        dM += tl.dot(b_do, tl.trans(b_vn), input_precision=PREC)
        if DELTA:
            dX = tl.dot(tl.trans(A), b_dvn, input_precision=PREC)  # gradient wrt beta v
            # dX replaces dv_new in place: the dq/dk kernel needs A^T dv_new h^T (the gradient wrt W
            # pulled through A) and forms it as dX h^T.
            _store_tile(dvn + i_h * V, dX, offs, valid, i_v * BV, H * V, V, BV)
            b_dv = dX * b[:, None]
            db += tl.sum(b_v * dX, 1)
            dL -= tl.dot(dX, tl.trans(b_vn), input_precision=PREC)
        else:
            b_dv = b_dvn * b[:, None]
            db += tl.sum(b_v * b_dvn, 1)
        _store_tile(dv + i_h * V, b_dv, offs, valid, i_v * BV, H * V, V, BV)
    D = (rows[:, None] >= rows[None, :]).to(tl.float32)
    if DECAY == 1:
        G, G_last = _decay_rows(gc, offs, valid, t_last, i_h, H)
        D = tl.where(D > 0, tl.exp(tl.where(D > 0, G[:, None] - G[None, :], 0.)), 0.)
    _store_tile(dMs + i_h * BT, dM * D, offs, valid, 0, H * BT, BT, BT)
    if DELTA:
        # L = beta_t pair_strict(k, k)_ts: the pair's gradient is dL beta_t, beta's sums dL pair.
        dL = tl.where(rows[:, None] > rows[None, :], dL, 0.)
        db += tl.sum(dL * _load_tile(Mkk + i_h * BT, offs, valid, 0, H * BT, BT, BT), 1)
        _store_tile(dLs + i_h * BT, dL * (b[:, None] * D), offs, valid, 0, H * BT, BT, BT)
    if HAS_BETA:
        tl.store(dbp + offs * H + i_h, db, mask=valid)


@triton.jit
def _dqk_bwd_kernel(q, k, v, beta, gc, rn, hs, vn, do, dhs, dvn, dMs, dLs, dbp, dq, dk, dbeta, dg,
                    cu, cidx, scale,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, BC: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr,
                    DECAY: tl.constexpr, HAS_BETA: tl.constexpr, DELTA: tl.constexpr, NORM: tl.constexpr,
                    PREC: tl.constexpr):
    """Per chunk, one K block at a time: dq, dk, the rest of dbeta, and dg.

    Each G_t multiplies the rows of q (and k in e^G terms) and divides the k terms e^{-G}, so the
    gradient wrt G is q dq - k dk summed over each term's own factors: kept per channel for a
    per-channel decay, summed over K blocks for a scalar one; dg is its reverse cumsum plus the G_last
    part. Under NORM the gradient wrt raw q needs sum_k qn dqn over the whole row: with several K blocks
    the normalised-space gradients are first stored in dq and dk themselves, then a second pass over the
    same rows (this program's own) turns them into the raw-space gradients in place: no scratch arrays,
    at the cost of one rounding to the gradients' dtype in between.

    The states and their gradients are read once, the chunk's rows (do, v_new or v, dX, q, k) once per
    K block: the states are loaded to be evicted first from L2, the rows to stay. Without these hints
    the kernel moved about three times its distinct data from DRAM (ncu: 64% of the bandwidth for 1.07 ms,
    about 2.3 GB, against about 0.8 GB, one group at the MoM layer's B8 x T2048); with them, and 8 warps,
    it took 1.90 ms there against 2.07 (H100, results/bench/core_configs.md)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    offs, valid, t_last, live = _chunk_rows(cu, cidx, i_t, BT)
    if not live:  # a chunk past the real count: nothing to do
        return
    hbase = (i_t.to(tl.int64) * H + i_h) * (K * V)
    b = _load_beta(beta, offs, valid, H, i_h, HAS_BETA)
    rq = _row_factor(rn, offs, valid, i_h, H, 0, NORM)
    rk = _row_factor(rn, offs, valid, i_h, H, 1, NORM)
    G = tl.zeros([BT], dtype=tl.float32)
    G_last = 0.
    eq = tl.full([BT], 1., dtype=tl.float32)
    ek = valid.to(tl.float32)
    if DECAY == 1:
        G, G_last = _decay_rows(gc, offs, valid, t_last, i_h, H)
        eq = tl.exp(G)
        ek = tl.where(valid, tl.exp(G_last - G), 0.)
    dG = tl.zeros([BT], dtype=tl.float32)    # scalar decay: the gradient wrt G
    dGk = tl.zeros([BT], dtype=tl.float32)   # scalar decay: rows of sum_k k dk for G_last
    hdh = tl.zeros([BK], dtype=tl.float32)   # scalar decay: sum_v h dh_next, summed over K blocks
    db = tl.zeros([BT], dtype=tl.float32)
    sq = tl.zeros([BT], dtype=tl.float32)
    sk = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(NK):
        c0 = i_k * BK
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)  # do h^T
        b_dk = tl.zeros([BT, BK], dtype=tl.float32)  # v_new dh_next^T
        b_dw = tl.zeros([BT, BK], dtype=tl.float32)  # A^T dv_new h^T = -(the gradient wrt beta k e^G)
        b_hdh = tl.zeros([BK], dtype=tl.float32)
        for i_v in range(NV):
            h = _load_state(hs, hbase, c0, i_v * BV, K, V, BK, BV, FIRST)
            dhn = _load_state(dhs, hbase, c0, i_v * BV, K, V, BK, BV, FIRST)
            b_do = _load_tile(do + i_h * V, offs, valid, i_v * BV, H * V, V, BV, LAST)
            if DELTA:
                b_vn = _load_tile(vn + i_h * V, offs, valid, i_v * BV, H * V, V, BV, LAST)
            else:
                b_vn = _load_tile(v + i_h * V, offs, valid, i_v * BV, H * V, V, BV, LAST) * b[:, None]
            b_dq += tl.dot(b_do, tl.trans(h), input_precision=PREC)
            b_dk += tl.dot(b_vn, tl.trans(dhn), input_precision=PREC)
            if DELTA:  # the dv kernel left A^T dv_new in dvn
                b_dX = _load_tile(dvn + i_h * V, offs, valid, i_v * BV, H * V, V, BV, LAST)
                b_dw += tl.dot(b_dX, tl.trans(h), input_precision=PREC)
            if DECAY > 0:
                b_hdh += tl.sum(h * dhn, 1)
        # The chunk's own tiles are (re)loaded here, after the V loop, to keep them out of its registers;
        # dq is finished first so that its tiles die before the dk terms.
        qn = _load_tile(q + i_h * K, offs, valid, c0, H * K, K, BK, LAST) * rq[:, None]
        qb = qn * scale
        kb = _load_tile(k + i_h * K, offs, valid, c0, H * K, K, BK, LAST) * rk[:, None]
        if DECAY == 2:
            Gb, Gb_last = _decay_cols(gc, offs, valid, t_last, i_h, c0, H, K, BK)
            eqb = tl.exp(Gb)
            ekb = tl.where(valid[:, None], tl.exp(Gb_last[None, :] - Gb), 0.)
        else:
            eqb = eq[:, None]
            ekb = ek[:, None]
        # Across chunks: (q e^G) h; inside the chunk: M = lower(q k^T e^{G_t - G_s}).
        b_dq = b_dq * eqb
        dM = _load_tile(dMs + i_h * BT, offs, valid, 0, H * BT, BT, BT)
        if DECAY == 2:
            da, dbk = _pair_channel_bwd(dM, dMs, qb, kb, Gb, q, k, gc, rn, offs, t_last, i_h, c0, scale, 1.0, H,
                                        K, BT, BK, BC, 0, 1, NORM, PREC)
        else:
            da = tl.dot(dM, kb, input_precision=PREC)
            dbk = tl.dot(tl.trans(dM), qb, input_precision=PREC)
        b_dq += da
        # The gradient wrt G: + q dq over every q term (all carry e^{+G})
        dGb = qb * b_dq
        b_dq = b_dq * scale  # now wrt the normalised q (or q itself)
        sq = _store_row_grad(dq + i_h * K, qn, rq, b_dq, sq, offs, valid, c0, H * K, K, BK, NK, NORM)
        # Across chunks: (k e^{G_last - G})^T v_new and e^{G_last} h (G_last's gradient).
        b_dk = b_dk * ekb
        if DECAY == 2:
            dGb_last = tl.sum(kb * b_dk, 0) + b_hdh * tl.exp(Gb_last)
        else:
            dGk += tl.sum(kb * b_dk, 1)
            hdh += b_hdh
        # - k dk over the k terms that carry e^{-G}, + over those with e^{+G}: each term on its own (a
        # difference of totals would cancel badly under strong decays)
        b_dk += dbk
        dGb -= kb * b_dk
        if DELTA:
            # W = A (beta k e^G): its gradient pulled through A.
            dWy = -b_dw
            x = kb * eqb * dWy
            db += tl.sum(x, 1)
            dGb += x * b[:, None]
            b_dk += dWy * (b[:, None] * eqb)
            # L = beta_t pair_strict(k, k): dL (already times beta) for both sides of the pair.
            dL = _load_tile(dLs + i_h * BT, offs, valid, 0, H * BT, BT, BT)
            if DECAY == 2:
                da, dbk = _pair_channel_bwd(dL, dLs, kb, kb, Gb, k, k, gc, rn, offs, t_last, i_h, c0, 1.0, 1.0,
                                            H, K, BT, BK, BC, 1, 1, NORM, PREC)
            else:
                da = tl.dot(dL, kb, input_precision=PREC)
                dbk = tl.dot(tl.trans(dL), kb, input_precision=PREC)
            b_dk += da + dbk
            dGb += kb * (da - dbk)
        if DECAY == 2:
            b_dg = tl.cumsum(dGb, 0, reverse=True) + dGb_last[None, :]
            _store_tile(dg + i_h * K, b_dg, offs, valid, c0, H * K, K, BK)
        if DECAY == 1:
            dG += tl.sum(dGb, 1)
        sk = _store_row_grad(dk + i_h * K, kb, rk, b_dk, sk, offs, valid, c0, H * K, K, BK, NK, NORM)
    if DECAY == 1:
        b_dg = tl.cumsum(dG, 0, reverse=True) + (tl.sum(dGk, 0) + tl.sum(hdh, 0) * tl.exp(G_last))
        tl.store(dg + offs * H + i_h, b_dg.to(dg.dtype.element_ty), mask=valid)
    if HAS_BETA:
        db += tl.load(dbp + offs * H + i_h, mask=valid, other=0.)
        tl.store(dbeta + offs * H + i_h, db.to(dbeta.dtype.element_ty), mask=valid)
    if NORM:
        if NK > 1:
            tl.debug_barrier()  # the first-pass rows were written by other threads of this program
            for i_k in range(NK):
                c0 = i_k * BK
                qn = _load_tile(q + i_h * K, offs, valid, c0, H * K, K, BK) * rq[:, None]
                x = _load_tile(dq + i_h * K, offs, valid, c0, H * K, K, BK)
                _store_tile(dq + i_h * K, rq[:, None] * (x - qn * sq[:, None]), offs, valid, c0, H * K, K, BK)
                kn = _load_tile(k + i_h * K, offs, valid, c0, H * K, K, BK) * rk[:, None]
                x = _load_tile(dk + i_h * K, offs, valid, c0, H * K, K, BK)
                _store_tile(dk + i_h * K, rk[:, None] * (x - kn * sk[:, None]), offs, valid, c0, H * K, K, BK)


# ----------------------------------------------------------------------------------------------------
# Decoding step
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------

# Test and tuning hook: entries here replace those of every `_config` result (e.g. BK=16 so that the
# K-block loops run more than once at the interpreter's tiny shapes).
CONFIG_OVERRIDES: dict = {}


def _config(K: int, V: int, chunk_size: int) -> dict:
    """Fixed block sizes (the interpreter cannot autotune).

    BT, the chunk, is a hint (the results do not depend on it): a power of 2 from 16 (tl.dot's least
    size) to 64, for every head dim. Every kernel works on K in blocks of BK (the sequential ones hold
    their state as up to 4 blocks of BK_h) and on V in blocks of BV (BV_h in the sequential kernels, BV_dqk
    in the dq/dk kernel). The step kernel holds the whole (KP, BV_h) state block.
    """
    KP = max(16, triton.next_power_of_2(K))
    if KP > MAX_HEAD_DIM:
        raise ValueError(f"head dim K={K}: the Triton core takes head dims up to {MAX_HEAD_DIM}")
    BT = min(max(16, triton.next_power_of_2(chunk_size)), 64)
    cfg = dict(
        BT=BT,
        BC=min(BT, 16),  # sub-chunk of the per-channel pairs
        KP=KP,
        BK=min(KP, 64),
        BV=max(16, min(triton.next_power_of_2(V), 64)),
        # The sequential kernels hold a (K, BV_h) state block in registers: narrower for wider keys.
        BV_h=max(16, min(triton.next_power_of_2(V), 64 if KP <= 64 else 32 if KP <= 256 else 16)),
        BV_dqk=max(16, min(triton.next_power_of_2(V), 64)),
        BK_dqk=min(KP, 64),
        BK_dqk_channel=min(KP, 32),  # per-channel decay: the sub-chunk pair gradients need more registers
        warps=4,        # o, dv
        # prep: 4 warps were faster than 8 for the gated delta rule at the MoM benchmark shapes, dq/dk
        # with its L2 hints 8 (results/bench/core_configs.md); per-channel decay (its sub-chunk pairs
        # need more registers) keeps 8 for prep, not measured against 4.
        warps_prep=4,
        warps_prep_channel=8,
        warps_h=4,      # h, dh
        warps_dqk=8,
        stages=1,
        # With bf16 operands (`_Plan.dot16`) the sequential kernels are pipelined over 2 stages (the next
        # chunk's loads in flight during this one's products): the MoM layer at B1 x T16384 took 10.31 ms
        # per fwd+bwd against 11.59 with 1 stage for the reverse kernel and 12.36 with 1 for both; at
        # B8 x T2048 10.42 against 10.88 and 11.54 (H100, core_configs.md). fp32 operands take twice the
        # shared memory, over the H100's 227 KB at K = 256, and so do the per-channel decay's extra tiles
        # in the reverse kernel. The other kernels gained nothing measurable from 2 stages.
        # At K = 512 one stage of the sequential kernels' loads (k, w, q: 64 KB each) leaves no room for
        # a second.
        stages_h_dot16=2 if KP <= 256 else 1,
        stages_dh_dot16=2 if KP <= 256 else 1,
        stages_dh_dot16_channel=1,
    )
    cfg.update(CONFIG_OVERRIDES)
    # The sequential kernels hold their state block as at most 4 tiles of BK_h key rows (each product
    # then has a (BT, BK_h) operand): BK up to K = 256, wider tiles beyond.
    cfg.setdefault("BK_h", max(cfg["BK"], KP // 4))
    if triton.cdiv(K, cfg["BK_h"]) > 4:
        raise ValueError(f"head dim K={K}: the sequential kernels hold at most 4 key blocks of {cfg['BK_h']}")
    return cfg


@triton.jit
def _chunk_layout_kernel(cu, cidx, coff, order, ok, N, NT, total, BT: tl.constexpr, BN: tl.constexpr,
                         BC: tl.constexpr):
    """Chunks c of this program: their segment (the number of segments before the last whose chunks
    end at or before c) and their index in it (c minus the chunks of those segments). Segments s of this
    program: their place in `order` (the segments with more chunks, or as many and before s, come first).
    Every program sums the segments' chunk counts itself; program 0 also writes the segments' chunk
    offsets and checks cu."""
    pid = tl.program_id(0)
    c = pid * BC + tl.arange(0, BC)
    seg = tl.zeros([BC], dtype=tl.int32)
    first = tl.zeros([BC], dtype=tl.int32)  # the chunk offset of that segment
    s = c  # this program's segments, for the order
    s_count = (tl.load(cu + s + 1, mask=s < N, other=0) - tl.load(cu + s, mask=s < N, other=0) + BT - 1) // BT
    rank = tl.zeros([BC], dtype=tl.int32)
    carry = 0
    bad = 0
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        lens = tl.load(cu + n + 1, mask=n < N, other=0) - tl.load(cu + n, mask=n < N, other=0)
        count = (lens + BT - 1) // BT
        ends = tl.cumsum(count, 0) + carry
        done = (ends[None, :] <= c[:, None]) & (n < N - 1)[None, :]
        seg += tl.sum(done.to(tl.int32), 1)
        first += tl.sum(tl.where(done, count[None, :], 0), 1)
        more, same = count[None, :] > s_count[:, None], count[None, :] == s_count[:, None]
        ahead = (more | (same & (n[None, :] < s[:, None]))) & (n < N)[None, :]
        rank += tl.sum(ahead.to(tl.int32), 1)
        if pid == 0:
            tl.store(coff + 1 + n, ends, mask=n < N)
            bad += tl.sum((lens < 0).to(tl.int32), 0)
        carry += tl.sum(count, 0)
    m = c < NT
    tl.store(cidx + 2 * c, seg, mask=m)
    tl.store(cidx + 2 * c + 1, c - first, mask=m)
    tl.store(order + rank, s, mask=s < N)
    if pid == 0:
        tl.store(coff, 0)
        bad += (tl.load(cu) != 0).to(tl.int32) + (tl.load(cu + N) != total).to(tl.int32)
        tl.store(ok, bad == 0)


def _chunk_layout(cu: Tensor, BT: int, total: int) -> Tuple[Tensor, Tensor, Tensor, int]:
    """For packed segments of `total` tokens: (chunk index (NT, 2) int32 of (segment, chunk in segment),
    chunk offset of every segment (N + 1) int32, the segments from most chunks to fewest (N) int32, NT).
    Also checks on the device that cu rises from 0 to total (an asynchronous assert).

    The sequential kernels take their segments in that order, the longest chains first: when their
    programs do not all fit on the GPU at once, the short chains then fill in behind the long ones rather
    than delaying them (MoM at B1 x T16384: the shared memory's 256-chunk chains against the routed
    memories' 128; 9.70 against 10.31 ms per fwd+bwd on an H100 with the order from a host argsort,
    results/bench/core_configs.md).

    One launch, with no host sync (a sync per call would stall the stream, and the MoM layer is bound by
    the host's enqueue at small sizes). NT is therefore the bound cdiv(total, BT) + N rather than the count:
    chunks past the real ones point past the end of the last segment, and their programs return."""
    N = len(cu) - 1
    NT = triton.cdiv(total, BT) + N
    cidx = torch.empty(NT, 2, device=cu.device, dtype=torch.int32)
    coff = torch.empty(N + 1, device=cu.device, dtype=torch.int32)
    order = torch.empty(N, device=cu.device, dtype=torch.int32)
    ok = torch.empty((), device=cu.device, dtype=torch.bool)
    BC = 128
    _chunk_layout_kernel[(max(triton.cdiv(NT, BC), 1),)](cu, cidx, coff, order, ok, N, NT, total, BT=BT, BN=256,
                                                         BC=BC)
    torch._assert_async(ok, f"cu_seqlens must rise from 0 to T={total}")
    return cidx, coff, order, NT


# The pipelined sequential kernels need up to 226 KB of shared memory per program at K = 256 (BT = 64):
# what a Hopper GPU (227 KB) has, an A100 (163 KB) not.
PIPELINE_SHARED_MEM = 227 * 1024


@functools.lru_cache(maxsize=None)
def _max_shared_mem(device) -> int:
    """Shared memory per program on `device` in bytes (0 off CUDA or under the interpreter)."""
    if device.type != "cuda" or INTERPRET:
        return 0
    return triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"]


class _Plan:
    """Shapes, switches and block sizes of one call, shared by forward and backward."""

    def __init__(self, q, k, v, g, beta, delta, scale, cu_seqlens, normalize_qk, chunk_size):
        B, T, H, K = q.shape
        V = v.shape[-1]
        cfg = _config(K, V, chunk_size)
        self.cfg = cfg
        self.B, self.T, self.H, self.K, self.V, self.BT = B, T, H, K, V, cfg["BT"]
        # cu_seqlens on the host (or none) lets the backward plan its groups without a sync
        self.cu_host = ([b * T for b in range(B + 1)] if cu_seqlens is None else
                        None if cu_seqlens.is_cuda else cu_seqlens.tolist())
        if cu_seqlens is None:
            cu_seqlens = torch.arange(B + 1, device=q.device, dtype=torch.int32) * T
        self.cu_copy = None
        self._layout(cu_seqlens.to(q.device, torch.int32).contiguous(), B, T)
        # What the passes store between kernels (states, W, U, v_new and their gradients): 16-bit inputs
        # keep them in bf16, as they keep their inputs (half the memory and traffic); fp32 inputs keep fp32.
        self.work = torch.float32 if q.dtype == torch.float32 else torch.bfloat16
        self.decay = 0 if g is None else (2 if g.dim() == 4 else 1)
        self.has_beta, self.delta, self.norm = beta is not None, bool(delta), bool(normalize_qk)
        self.scale = float(K ** -0.5 if scale is None else scale)
        # fp32 inputs: three-pass tf32 products, about fp32-accurate ("ieee" unrolls into FMA code that
        # takes minutes to compile); 16-bit inputs: one-pass tf32 on fp32 operands, except where DOT16.
        self.prec = "tf32x3" if all(x.dtype == torch.float32 for x in (q, k, v)) else "tf32"
        # bf16 inputs (DOT16): the two sequential kernels and the o kernel multiply on bf16 operands, with
        # fp32 accumulation. Their inputs and W are bf16 arrays already (exact, unless a per-channel decay
        # scales them); the running state and v_new (or their gradients) are rounded to bf16 as they are
        # stored for the other kernels anyway. That takes half the shared memory and tensor-core issue of
        # tf32: the sequential passes, bound by their chain of steps, took 17-18% less at the MoM layer's
        # B1 x T16384 (results/bench/README.md).
        # M stays tf32 (computed in fp32), and so do the other kernels: the dq/dk kernel, short of
        # registers, spilled more and was slower on bf16 operands.
        self.dot16 = all(x.dtype == torch.bfloat16 for x in (q, k, v)) and cfg.get("dot16", True)
        self.BK, self.BV, self.KP, self.BV_h, self.BC = cfg["BK"], cfg["BV"], cfg["KP"], cfg["BV_h"], cfg["BC"]
        self.BV_dqk, self.BK_dqk = cfg["BV_dqk"], cfg["BK_dqk_channel" if self.decay == 2 else "BK_dqk"]
        self.NK, self.NV = triton.cdiv(K, self.BK), triton.cdiv(V, self.BV)
        self.BK_h = cfg["BK_h"]
        self.NK_h = triton.cdiv(K, self.BK_h)

    def copy_cu_to_host(self) -> None:
        """Start copying cu_seqlens from the GPU to the host, without waiting: the forward calls this first
        when its backward will run in groups, so that the backward's read (`host_cu`) waits only until the
        GPU has passed this copy, not for the whole forward."""
        if self.cu_host is None and self.cu_copy is None:
            buf = torch.empty(len(self.cu), dtype=self.cu.dtype, pin_memory=True)
            buf.copy_(self.cu, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self.cu_copy = (buf, done)

    def host_cu(self) -> list:
        if self.cu_host is None:
            self.copy_cu_to_host()  # not started in the forward: this waits for the GPU
            buf, done = self.cu_copy
            done.synchronize()
            self.cu_host = buf.tolist()
        return self.cu_host

    def _layout(self, cu: Tensor, B: int, T: int) -> None:
        self.cu, self.B, self.T, self.N = cu, B, T, len(cu) - 1
        self.cidx, self.coff, self.order, self.NT = _chunk_layout(cu, self.BT, B * T)

    def group(self, s0: int, s1: int, t0: int, t1: int) -> "_Plan":
        """The plan of segments s0..s1-1, which hold tokens t0..t1-1, as one packed batch of their own."""
        sub = copy.copy(self)
        sub._layout(self.cu[s0:s1 + 1] - t0, 1, t1 - t0)
        sub.cu_host = [c - t0 for c in self.host_cu()[s0:s1 + 1]]
        return sub

    def launch(self, which="", kernel=""):
        """num_warps of the kernel kind `which`; num_stages of the kernel named `kernel` (`stages_<kernel>`
        in the config, else `stages`; under DOT16, on a GPU with Hopper's shared memory,
        `stages_<kernel>_dot16`, or `stages_<kernel>_dot16_channel` for a per-channel decay, first)."""
        channel = "_channel" if self.decay == 2 and "warps" + which + "_channel" in self.cfg else ""
        stages = self.cfg.get("stages_" + kernel, self.cfg["stages"])
        if self.dot16 and _max_shared_mem(self.cu.device) >= PIPELINE_SHARED_MEM:
            key = f"stages_{kernel}_dot16"
            stages = self.cfg.get(key + ("_channel" if self.decay == 2 else ""), self.cfg.get(key, stages))
        return dict(num_warps=self.cfg["warps" + which + channel], num_stages=stages)

    def switches(self):
        return dict(DECAY=self.decay, DELTA=self.delta, NORM=self.norm, PREC=self.prec)

    def flat(self, x):
        """(B, T, H, ...) -> (B*T, H, ...) contiguous; None stays None."""
        return None if x is None else x.reshape((self.B * self.T,) + tuple(x.shape[2:])).contiguous()


def _forward_states(p: _Plan, q, k, v, g, beta, h0, Ai=None, kept=None, final=True) -> dict:
    """prep and the sequential pass: G (gc), row norms (rn), M and pair_strict(k, k) per chunk row (Mqk,
    Mkk), A (Ai; taken as given if passed: the backward reuses the forward's), W, U, the state at every
    chunk start (hs), v_new (vn), and with `final` the final state (ht). What `kept` holds (the
    forward's; see `_keep`) is not computed again: given prep's output and v_new, the sequential pass
    only forms the states from v_new."""
    kept = kept or {}
    s = dict(kept, Ai=Ai)
    TT, H, K, V, BT = p.B * p.T, p.H, p.K, p.V, p.BT
    dev, f32 = k.device, torch.float32
    new = lambda *shape: torch.empty(*shape, device=dev, dtype=f32)
    work = lambda *shape: torch.empty(*shape, device=dev, dtype=p.work)
    x = k  # stands in for pointers a switch leaves unused
    sequential = "hs" not in kept
    from_vn = sequential and p.delta and "vn" in kept
    if any(n not in kept for n in PREP):
        want_u = sequential and p.delta and not from_vn  # U is read by the sequential pass only
        s.update(gc=(new(TT, H, K) if p.decay == 2 else new(TT, H)) if p.decay else None,
                 rn=new(TT, H, 2) if p.norm else None, Mqk=new(TT, H, BT),
                 Mkk=new(TT, H, BT) if p.delta else None,
                 Ai=(new(TT, H, BT) if Ai is None else Ai) if p.delta else None,
                 w=work(TT, H, K) if p.delta else None, u=work(TT, H, V) if want_u else None)
        o = {n: _or(t, x) for n, t in s.items()}
        if p.NT:
            _prep_kernel[(p.NT, H)](q, k, v, _or(g, x), _or(beta, x), o["gc"], o["rn"], o["Mqk"], o["Mkk"],
                                    o["Ai"], o["w"], o["u"], p.cu, p.cidx, p.scale, H=H, K=K, V=V, BT=BT,
                                    BK=p.BK, BV=p.BV, BC=p.BC, NK=p.NK, NV=p.NV, HAS_BETA=p.has_beta,
                                    HAVE_A=Ai is not None, WANT_U=want_u, **p.switches(),
                                    **p.launch("_prep", "prep"))
    if not sequential:
        return s
    s.update(hs=work(p.NT, H, K, V), ht=new(p.N, H, K, V) if final else None)
    if not from_vn:
        s["vn"] = work(TT, H, V) if p.delta else None
    o = {n: _or(t, x) for n, t in s.items()}
    # From v_new the pass is the plain one (no delta rule, beta already applied): v_new for v.
    switches = dict(p.switches(), DELTA=False) if from_vn else p.switches()
    _h_fwd_kernel[(triton.cdiv(V, p.BV_h), p.N * H)](
        k, s["vn"] if from_vn else v, x if from_vn else _or(beta, x), o["gc"], o["rn"], o["w"], o.get("u", x),
        _or(h0, x), s["hs"], o["vn"], o["ht"], p.cu, p.coff, p.order, H=H, K=K, V=V, BT=BT, BK=p.BK_h,
        NK=p.NK_h, BV=p.BV_h, HAS_BETA=p.has_beta and not from_vn, HAS_H0=h0 is not None, STORE_HT=final,
        DOT16=p.dot16, **switches, **p.launch("_h", "h"))
    s["u"] = None  # read by the sequential pass only
    return s


def _or(t, default):
    return default if t is None else t


class ChunkMemoryFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, cu_seqlens, scale, delta, normalize_qk, chunk_size):
        p = _Plan(q, k, v, g, beta, delta, scale, cu_seqlens, normalize_qk, chunk_size)
        grouped = any(ctx.needs_input_grad) and _group_count(p) > 1
        if grouped:  # ahead of this call's kernels in the stream, so that the backward waits as little as it can
            p.copy_cu_to_host()
        fq, fk, fv, fg, fb = (p.flat(x) for x in (q, k, v, g, beta))
        h0 = None if initial_state is None else initial_state.contiguous()
        s = _forward_states(p, fq, fk, fv, fg, fb, h0)
        o = torch.empty_like(fv)
        if p.NT:
            x = fk
            _o_fwd_kernel[(p.NV, p.NT, p.H)](fq, fv, _or(fb, x), _or(s["gc"], x), _or(s["rn"], x), s["Mqk"],
                                             s["hs"], _or(s["vn"], x), o, p.cu, p.cidx, p.scale, H=p.H, K=p.K,
                                             V=p.V, BT=p.BT, BK=p.BK, BV=p.BV, NK=p.NK, HAS_BETA=p.has_beta,
                                             DOT16=p.dot16, **p.switches(), **p.launch(kernel="o"))
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        ctx.plan = p
        if any(ctx.needs_input_grad):
            # A, the inverse, takes 12 of the prep kernel's BT x BT x BT products (and 3/4 of its work at
            # head dim 64): always kept. The other intermediates are kept within KEEP_BYTES (`_keep`),
            # else recomputed by the backward.
            ctx.Ai = s["Ai"]
            ctx.kept = _keep(s, grouped)
        ctx.set_materialize_grads(False)  # an unused final state comes back as None: skip its gradient
        return o.view(v.shape), s["ht"]

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, initial_state = ctx.saved_tensors
        p = ctx.plan
        fq, fk, fv, fg, fb = (p.flat(x) for x in (q, k, v, g, beta))
        ins = dict(q=fq, k=fk, v=fv, g=fg, beta=fb, do=torch.zeros_like(fv) if do is None else p.flat(do),
                   Ai=ctx.Ai)
        states = dict(h0=None if initial_state is None else initial_state.contiguous(),
                      dht=None if dht is None else dht.contiguous())
        like = lambda t: None if t is None else torch.empty_like(t)
        grads = dict(dq=like(fq), dk=like(fk), dv=like(fv), dg=like(fg), db=like(fb))
        dstates = dict(dh0=None if initial_state is None else
                       torch.empty(p.N, p.H, p.K, p.V, device=fv.device, dtype=torch.float32))
        cut = lambda d, lo, hi: {n: None if t is None else t[lo:hi] for n, t in d.items()}
        for sp, (s0, s1, t0, t1) in _groups(p):  # each group's tokens and states are row slices: views
            _backward(sp, **cut(ins, t0, t1), **cut(states, s0, s1), **cut(grads, t0, t1), **cut(dstates, s0, s1),
                      kept=cut(ctx.kept, t0, t1) if ctx.kept and sp is not p else ctx.kept)
        dh0 = dstates["dh0"]
        shaped = [None if t is None else grads[n].view(t.shape) for n, t in
                  zip(("dq", "dk", "dv", "dg", "db"), (q, k, v, g, beta))]
        return (*shaped, None if dh0 is None else dh0.to(initial_state.dtype), None, None, None, None, None)


# The backward recomputes the forward's intermediates and adds their gradients. What is alive at once
# (chunk states and their gradients, v_new and its gradient, the gradients of the chunk matrices) comes
# to about 1.1 GB for the MoM layer's 49K (token, memory) pairs with 4 x 256 x 256 states. Above
# WORKSPACE_BYTES the backward runs over groups of whole segments, one after another, so that only one
# group's workspace is alive; but into no more groups than keep MIN_CHAINS (segment, head) chains each on
# average, which the sequential kernels run in parallel (fewer would leave the GPU idle). Groups are planned
# on the host: cu_seqlens on the GPU are copied to it from the start of the forward, and the backward
# waits for that copy (the one host sync of a call that runs in groups).
# Fewer groups are faster: at 768 MB the MoM layer at B8 x T2048 runs in 2 groups (9.75 ms, peak 1951 MB
# on an H100, with the rows kept as below), where 512 MB made 3 (10.08 ms, 1818 MB) and one group would
# peak near 2450 MB, above flash-linear-attention's 1991 (results/bench/core_configs.md).
WORKSPACE_BYTES = 768 * 2 ** 20
MIN_CHAINS = 32
# The forward keeps, within KEEP_BYTES, what the backward would recompute. When the backward runs as one
# group: all of it if it fits (then the backward runs neither prep nor the sequential pass), else the
# chunk states and v_new. Those are the sequential pass's output, whose run time is set by the chain
# length, not the work: with few long segments (B1 x T16384: 20 chains of up to 256 chunks) that pass
# takes about a fifth of the MoM layer's time, and recomputing it costs as much again. At small sizes
# (MQAR) keeping prep's output saves a launch and its work. 768 MB keeps all of it at B1 x T16384 too:
# 0.26-0.30 ms less than 512 MB for 97 MB more (H100, results/bench/core_configs.md).
# In groups, the chunk states (the bulk of a group's workspace) are not kept, but prep's output and v_new
# are: arrays of token rows, of which each group reads its slice. A group then runs only the sequential
# pass, and that from v_new, which takes W h off its chain of steps. At B8 x T2048: 10.5 -> 9.75 ms, peak
# 1757 -> 1951 MB (those rows stay alive through both groups; H100).
KEEP_BYTES = 768 * 2 ** 20
SEQUENTIAL, PREP = ("hs", "vn"), ("gc", "rn", "Mqk", "Mkk", "w")
ROWS = PREP + ("vn",)  # arrays of token rows, of which a group of segments reads a row slice


def _keep(s: dict, grouped: bool) -> Optional[dict]:
    """What the backward takes from the forward's intermediates s instead of recomputing it."""
    for names in ((ROWS,) if grouped else (SEQUENTIAL + PREP, SEQUENTIAL)):
        kept = {n: s[n] for n in names}
        if sum(t.numel() * t.element_size() for t in kept.values() if t is not None) <= KEEP_BYTES:
            return kept
    return None


def _group_count(p: "_Plan") -> int:
    if p.cu_host is None and torch.cuda.is_current_stream_capturing():
        # Planning groups reads cu_seqlens on the host, which a CUDA graph capture cannot wait for: a
        # captured call (torch.cuda.make_graphed_callables) runs as one group, at the memory that takes.
        return 1
    e = torch.finfo(p.work).bits // 8
    per_token = p.H * (2 * p.K * p.V * e / p.BT + 2 * p.V * e + 2 * p.BT * 4)
    return min(int(p.B * p.T * per_token // WORKSPACE_BYTES) + 1, p.N * p.H // MIN_CHAINS)


def _groups(p: "_Plan"):
    """(plan, (first segment, end segment, first token, end token)) for each group of the backward."""
    n = _group_count(p)
    if n < 2:
        return [(p, (0, p.N, 0, p.B * p.T))]
    cu = p.host_cu()
    bounds, target = [0], cu[-1] / n
    for i in range(1, p.N):
        if cu[i] - cu[bounds[-1]] >= target:
            bounds.append(i)
    bounds.append(p.N)
    return [(p.group(s0, s1, cu[s0], cu[s1]), (s0, s1, cu[s0], cu[s1])) for s0, s1 in zip(bounds, bounds[1:])]


def _backward(p: "_Plan", q, k, v, g, beta, do, Ai, h0, dht, dq, dk, dv, dg, db, dh0, kept=None) -> None:
    """The gradients of the packed segments of plan p, written into dq, dk, dv, dg, db, dh0; `kept`: what
    the forward kept of its intermediates (`_keep`), these segments' share."""
    s = _forward_states(p, q, k, v, g, beta, h0, Ai, kept, final=False)
    TT, H, K, V, BT = p.B * p.T, p.H, p.K, p.V, p.BT
    dev, f32 = v.device, torch.float32
    x = k  # stands in for pointers a switch leaves unused
    o = {n: _or(t, x) for n, t in s.items()}
    dhs = torch.empty_like(s["hs"])
    dvn = torch.empty(TT, H, V, device=dev, dtype=p.work)
    if p.NT:
        _dvn_intra_kernel[(p.NV, p.NT, H)](s["Mqk"], do, dvn, p.cu, p.cidx, H=H, V=V, BT=BT, BV=p.BV, PREC=p.prec,
                                           **p.launch(kernel="dvn"))
    _dh_bwd_kernel[(triton.cdiv(V, p.BV_h), p.N * H)](
        q, k, o["gc"], o["rn"], o["w"], do, _or(dht, x), dhs, dvn, _or(dh0, x), p.cu, p.coff,
        p.order, p.scale, H=H, K=K, V=V, BT=BT, BK=p.BK_h, NK=p.NK_h, BV=p.BV_h, HAS_DHT=dht is not None,
        HAS_H0=h0 is not None, DOT16=p.dot16, **p.switches(), **p.launch("_h", "dh"))
    # read by the intra-chunk dv and reverse passes only: freed here, unless the forward kept them
    s["w"] = s["Mqk"] = o["w"] = o["Mqk"] = None
    if not p.NT:
        for t in (dq, dk, dv, dg, db):
            if t is not None:
                t.zero_()
        return
    dMs = torch.empty(TT, H, BT, device=dev, dtype=f32)
    dLs = torch.empty(TT, H, BT, device=dev, dtype=f32) if p.delta else None
    dbp = torch.empty(TT, H, device=dev, dtype=f32) if p.has_beta else None
    _dv_bwd_kernel[(p.NT, H)](v, _or(beta, x), o["gc"], o["Ai"], o["Mkk"], o["vn"], do, dvn, dv, dMs,
                              _or(dLs, x), _or(dbp, x), p.cu, p.cidx, H=H, V=V, BT=BT, BV=p.BV, NV=p.NV,
                              DECAY=p.decay, HAS_BETA=p.has_beta, DELTA=p.delta, PREC=p.prec,
                              **p.launch(kernel="dv"))
    s["Mkk"] = s["Ai"] = o["Mkk"] = o["Ai"] = None  # read by the dv kernel only
    _dqk_bwd_kernel[(p.NT, H)](q, k, v, _or(beta, x), o["gc"], o["rn"], s["hs"], o["vn"], do, dhs, dvn, dMs,
                               _or(dLs, x), _or(dbp, x), dq, dk, _or(db, x), _or(dg, x), p.cu, p.cidx, p.scale,
                               H=H, K=K, V=V, BT=BT, BK=p.BK_dqk, BV=p.BV_dqk, BC=p.BC,
                               NK=triton.cdiv(K, p.BK_dqk), NV=triton.cdiv(V, p.BV_dqk), HAS_BETA=p.has_beta,
                               **p.switches(), **p.launch("_dqk", "dqk"))


def chunk(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None, beta: Optional[Tensor] = None,
                 delta: bool = False, scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                 cu_seqlens: Optional[Tensor] = None, normalize_qk: bool = False,
                 chunk_size: int = 64) -> Tuple[Tensor, Tensor]:
    """The chunked memory recurrence on Triton: the signature and results of `reference.chunk`.

    Returns (o (B, T, H, V) in v's dtype, final state (N, H, K, V) float32); differentiable wrt q, k, v,
    g, beta and initial_state. chunk_size is a hint: see `_config`.
    """
    on_device = cu_seqlens is not None and cu_seqlens.is_cuda  # then `_chunk_layout` checks its values
    _reference._check(q, k, v, g, beta, cu_seqlens, initial_state, cu_values=not on_device)
    return ChunkMemoryFunction.apply(q, k, v, g, beta, initial_state, cu_seqlens, scale, delta, normalize_qk,
                                     chunk_size)


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


__all__ = ["chunk", "step", "ChunkMemoryFunction"]
