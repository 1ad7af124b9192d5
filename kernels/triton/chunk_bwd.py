"""The backward kernels of the chunked core (the algorithm: `chunk`'s module docstring): the reverse pass
over chunks (dh, with dv_new's share from inside each chunk apart: dvn_intra), then per chunk dv and
dq/dk."""
from __future__ import annotations

import triton
import triton.language as tl

from .jit import (FIRST, LAST, _chunk_rows, _decay_cols, _decay_rows, _load_beta, _load_state, _load_tile, _lp,
                  _pair_channel_bwd, _row_factor, _sequential_program, _states_init, _store_row_grad,
                  _store_states, _store_tile)


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
    the kernel moved about three times its distinct data from DRAM (TUNING.md)."""
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

