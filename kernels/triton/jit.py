"""The small @triton.jit helpers that the chunked core's forward and backward kernels share (tiles, states,
row factors, decay, the per-channel pairs, the unit lower inverse) and the constants they read."""
from __future__ import annotations

import triton
import triton.language as tl

from .env import interpreting

INTERPRET = interpreting()
# The interpreter's tl.dot multiplies the bit patterns of bf16 operands (triton-lang/triton#11584): there
# `_lp` rounds operands to bf16 but hands them over as fp32, which gives the same products.
_BF16_DOT = tl.constexpr(not INTERPRET)
EPS = tl.constexpr(1e-6)  # the eps of reference.l2norm
FIRST, LAST = tl.constexpr("evict_first"), tl.constexpr("evict_last")  # L2 eviction policies of loads


@triton.jit
def _chunk_rows(cu, cidx, i_t, BT: tl.constexpr):
    """Token indices of global chunk i_t, which rows are inside its segment, its last real token, and
    whether it has any (the grid is an upper bound on the chunk count: see `chunk._chunk_layout`)."""
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


@triton.jit
def _lp(x, DOT16: tl.constexpr):
    """A product operand: bf16 under DOT16 (see `chunk._Plan.dot16`), else as it is."""
    if DOT16:
        y = x.to(tl.bfloat16)
        if not _BF16_DOT:
            y = y.to(tl.float32)
    else:
        y = x
    return y


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
    """The NK <= 4 (BK, BV) tiles of a state held by one program (see `chunk_fwd._h_fwd_kernel`), loaded
    under HAS; the tiles past NK are zeros that the kernels never use, so they cost nothing once compiled."""
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

