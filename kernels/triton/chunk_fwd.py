"""The forward kernels of the chunked core (the algorithm: `chunk`'s module docstring): prep (norms, G, the
pair matrices, the WY representation), the sequential pass over chunks (h) and the output (o)."""
from __future__ import annotations

import triton
import triton.language as tl

from .jit import (EPS, _chunk_rows, _decay_cols, _decay_rows, _load_beta, _load_state, _load_tile, _lp,
                  _pair_channel, _row_factor, _sequential_program, _states_init, _store_states, _store_tile,
                  _unit_lower_inverse)


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
def _w_h(w, h, offs, valid, col0, i_h, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
         DOT16: tl.constexpr):
    """One K block's share of W h."""
    ww = _load_tile(w + i_h * K, offs, valid, col0, H * K, K, BK)
    return tl.dot(_lp(ww, DOT16), _lp(h, DOT16), input_precision=PREC)


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
    under STORE_HT the final state; the segments in `order` (see `chunk._chunk_layout`). Given v_new as v (with
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

