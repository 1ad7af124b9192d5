"""Triton kernels for the short causal convolution (depthwise, then SiLU) over packed segments; the
reference is `reference.short_conv`.

Tokens come packed as x (N, C) with `pos` (N,), each token's position inside its segment; a tap that
would reach back past the start of the segment reads zero, so segments never see each other. With taps
w (C, W), w[:, W-1] applied to the current token:

    y[t] = silu(b + sum_{j < W} w[:, W-1-j] * x[t-j] * [pos[t] >= j])

The reference is a few shifted products. On a GPU that is about twenty full passes over (N, C) per
convolution, forward and backward, plus a reduction per tap, over every routed copy of every token. The
kernels read x once forward; backward is two passes: the gradient before the SiLU with per-block partial
sums for w and b, then dx. The MoM layer convolves q, k and v in one call: the output can be split into
up to three column blocks, each its own contiguous array (what the core reads), and their gradients come
back as three arrays too.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor


@triton.jit
def _pre(x, sx, w, b, pos_r, rows, cols, N, C, W: tl.constexpr):
    """The convolution before the SiLU for a (rows, cols) tile, in fp32; x's rows are sx apart."""
    cmask = cols < C
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    acc += tl.load(b + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(W):
        src = rows - j
        ok = (rows < N) & (src >= 0) & (pos_r >= j)
        xt = tl.load(x + src[:, None] * sx + cols[None, :], mask=ok[:, None] & cmask[None, :], other=0.0)
        wj = tl.load(w + cols * W + (W - 1 - j), mask=cmask, other=0.0).to(tl.float32)
        acc += xt.to(tl.float32) * wj[None, :]
    return acc


@triton.jit
def _load_split(y0, y1, y2, C0, C1, C2, c0, rows, cols, m):
    """The (rows, cols) tile of an (N, C0 + C1 + C2) array held as three row-major arrays of C0, C1 and C2
    columns; c0 is the tile's first column, and the tile lies in one block. Each block is addressed with
    its own width, a kernel argument, so its loads stay vectorised (16 bytes when the widths are
    multiples of 16; an offset selected per column would make them one element each)."""
    if c0 < C0:
        t = tl.load(y0 + rows[:, None] * C0 + cols[None, :], mask=m, other=0.0)
    elif c0 < C0 + C1:
        t = tl.load(y1 + rows[:, None] * C1 + (cols - C0)[None, :], mask=m, other=0.0)
    else:
        t = tl.load(y2 + rows[:, None] * C2 + (cols - C0 - C1)[None, :], mask=m, other=0.0)
    return t


@triton.jit
def _store_split(y0, y1, y2, C0, C1, C2, c0, rows, cols, val, m):
    """Store a tile into the three arrays of `_load_split`."""
    if c0 < C0:
        tl.store(y0 + rows[:, None] * C0 + cols[None, :], val.to(y0.dtype.element_ty), mask=m)
    elif c0 < C0 + C1:
        tl.store(y1 + rows[:, None] * C1 + (cols - C0)[None, :], val.to(y1.dtype.element_ty), mask=m)
    else:
        tl.store(y2 + rows[:, None] * C2 + (cols - C0 - C1)[None, :], val.to(y2.dtype.element_ty), mask=m)


@triton.jit
def _fwd_kernel(x, sx, w, b, pos, y0, y1, y2, C0, C1, C2, N, C, W: tl.constexpr, BN: tl.constexpr,
                BC: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    c0 = tl.program_id(1) * BC
    cols = c0 + tl.arange(0, BC)
    pos_r = tl.load(pos + rows, mask=rows < N, other=0)
    pre = _pre(x, sx, w, b, pos_r, rows, cols, N, C, W)
    m = (rows < N)[:, None] & (cols < C)[None, :]
    _store_split(y0, y1, y2, C0, C1, C2, c0, rows, cols, pre * tl.sigmoid(pre), m)


@triton.jit
def _dpre_kernel(x, sx, w, b, pos, dy0, dy1, dy2, C0, C1, C2, dpre, dw_part, db_part, N, C,
                 W: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):
    """dpre = dy * silu'(pre), and this row block's share of dw and db (summed over blocks on the host)."""
    i_n = tl.program_id(0)
    rows = i_n * BN + tl.arange(0, BN)
    c0 = tl.program_id(1) * BC
    cols = c0 + tl.arange(0, BC)
    rmask, cmask = rows < N, cols < C
    pos_r = tl.load(pos + rows, mask=rmask, other=0)
    pre = _pre(x, sx, w, b, pos_r, rows, cols, N, C, W)
    sig = tl.sigmoid(pre)
    m = rmask[:, None] & cmask[None, :]
    g = _load_split(dy0, dy1, dy2, C0, C1, C2, c0, rows, cols, m).to(tl.float32)
    d = g * sig * (1 + pre * (1 - sig))
    tl.store(dpre + rows[:, None] * C + cols[None, :], d.to(dpre.dtype.element_ty), mask=m)
    tl.store(db_part + i_n * C + cols, tl.sum(d, 0), mask=cmask)
    for j in tl.static_range(W):
        src = rows - j
        ok = rmask & (src >= 0) & (pos_r >= j)
        xt = tl.load(x + src[:, None] * sx + cols[None, :], mask=ok[:, None] & cmask[None, :], other=0.0)
        tl.store(dw_part + (i_n * C + cols) * W + (W - 1 - j), tl.sum(d * xt.to(tl.float32), 0), mask=cmask)


@triton.jit
def _dx_kernel(w, pos, dpre, dx, sdx, N, C, W: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):
    """dx[t] = sum_j w[:, W-1-j] * dpre[t+j] * [pos[t+j] >= j]: the taps that read x[t]; dx's rows are sdx
    apart."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < C
    acc = tl.zeros((BN, BC), dtype=tl.float32)
    for j in tl.static_range(W):
        dst = rows + j
        ok = (rows < N) & (dst < N)
        ok = ok & (tl.load(pos + dst, mask=ok, other=0) >= j)
        d = tl.load(dpre + dst[:, None] * C + cols[None, :], mask=ok[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
        acc += d * tl.load(w + cols * W + (W - 1 - j), mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(dx + rows[:, None] * sdx + cols[None, :], acc.to(dx.dtype.element_ty),
             mask=(rows < N)[:, None] & cmask[None, :])


# Tile of one program per kernel: BN rows (tokens) by at most BC channels, and its warps. Module-level so
# benchmarks can try others (mom_bench.bench.tools.conv_tiles). The first backward pass sums its tile's rows
# for dw and db: in one warp those sums need no shared memory or barriers. The measurements: TUNING.md.
CONFIG = dict(fwd=dict(BN=32, BC=128, num_warps=4), dpre=dict(BN=16, BC=64, num_warps=1),
              dx=dict(BN=64, BC=128, num_warps=4))


def _grid(N: int, split: Sequence[int], kernel: str):
    """Tile sizes, grid and launch options of `kernel`. A column tile must lie inside one output block:
    BC divides every block's width but the last (whose tail the column mask covers)."""
    cfg = dict(CONFIG[kernel])
    BC = min(cfg["BC"], triton.next_power_of_2(max(sum(split), 16)))
    for width in split[:-1]:
        if width:
            BC = min(BC, width & -width)  # the largest power of two dividing the width
    cfg["BC"] = BC
    return cfg, (triton.cdiv(N, cfg["BN"]), triton.cdiv(sum(split), BC))


class ShortConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pos, split):
        # x may be a column block of a wider array (the MoM projections are one product): rows may be
        # any distance apart, but each row must be contiguous. A distance that is a multiple of 16
        # elements keeps the loads vectorised (Triton specialises integer arguments on it). Columns of x
        # past the weight's channels are not convolved: they come back as one more output (a copy).
        x = x if x.stride(-1) == 1 else x.contiguous()
        weight, bias, pos = weight.contiguous(), bias.contiguous(), pos.contiguous()
        N, C = x.shape[0], weight.shape[0]
        ys = [x.new_empty(N, c) for c in split]  # contiguous, whatever the layout of x
        tile, grid = _grid(N, split, "fwd")
        if N:
            _fwd_kernel[grid](x, x.stride(0), weight, bias, pos, *_blocks(ys), N, C, weight.shape[1], **tile)
        ctx.save_for_backward(x, weight, bias, pos)
        ctx.split = split
        return tuple(ys) + ((x[:, C:].clone(),) if x.shape[1] > C else ())

    @staticmethod
    def backward(ctx, *grads):
        x, weight, bias, pos = ctx.saved_tensors
        N, C, W = x.shape[0], weight.shape[0], weight.shape[1]
        dys = grads[:len(ctx.split)]
        tile, grid = _grid(N, ctx.split, "dpre")
        # dpre is written by the first pass and read back by the second, in x's dtype: for 16-bit inputs
        # half the traffic of fp32, and dx is rounded to that dtype anyway.
        dpre = x.new_empty(N, C)
        # every (row block, channel) share is written (no rows: no blocks, and the sums are zero)
        dw_part = torch.empty(grid[0], C, W, device=x.device, dtype=torch.float32)
        db_part = torch.empty(grid[0], C, device=x.device, dtype=torch.float32)
        # One array for the whole gradient of x: the convolved columns by the kernel, the others copied.
        dx = x.new_empty(x.shape)
        if x.shape[1] > C:
            rest = grads[len(ctx.split)]
            dx[:, C:] = 0 if rest is None else rest
        if N:
            _dpre_kernel[grid](x, x.stride(0), weight, bias, pos, *_blocks([d.contiguous() for d in dys]), dpre,
                               dw_part, db_part, N, C, W, **tile)
            tile, grid = _grid(N, ctx.split, "dx")
            _dx_kernel[grid](weight, pos, dpre, dx, dx.stride(0), N, C, W, **tile)
        return dx, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(bias.dtype), None, None


def _blocks(ts):
    """Kernel arguments for up to three column blocks: three pointers and three widths."""
    widths = [t.shape[1] for t in ts] + [0, 0]
    return (*ts, *[ts[0]] * (3 - len(ts)), *widths[:3])


def short_conv(x: Tensor, weight: Tensor, bias: Tensor, pos: Tensor, split: Sequence[int] = ()):
    """The convolution of x (N, C) with C = weight's channels; with split (widths summing to C), its column
    blocks as separate contiguous arrays, written so by the kernel (q, k and v of one convolution need no
    copy). x may have more columns than C: those are not convolved, and come back after the blocks as one
    array, so that the whole gradient of x is written into one array (split apart by torch, its
    pieces' gradients would be concatenated: a copy of all of it)."""
    C = weight.shape[0]
    if x.shape[1] < C or (split and sum(split) != C):
        raise ValueError(f"split {tuple(split)} must sum to the weight's {C} channels, at most x's {x.shape[1]}")
    if len(split) > 3:
        raise ValueError(f"the short convolution splits its output into at most 3 blocks, got {len(split)}")
    ys = ShortConvFunction.apply(x, weight, bias, pos, tuple(split) or (C,))
    return ys if split or len(ys) > 1 else ys[0]
