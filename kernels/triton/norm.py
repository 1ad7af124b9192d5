"""Triton kernels for the gated output norm of the memory mixers; the reference is
`reference.gated_rms_norm`.

Per row x of V channels (one head of one token), with weight w and gate g of the same shape:

    y = x * rsqrt(mean(x^2) + eps) * w * silu(g)

In PyTorch that is about ten elementwise passes forward and a dozen backward over the (tokens, H * V)
output, each a kernel launch. Here the forward is one pass, which also keeps each row's rsqrt; the
backward is one pass too, with per-block partial sums for the gradient of w (summed on the host).
Everything is computed in fp32 and rounded once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor


@triton.jit
def _tile(rows, R, V, BV: tl.constexpr):
    cols = tl.arange(0, BV)
    return cols, rows[:, None] * V + cols[None, :], (rows < R)[:, None] & (cols < V)[None, :]


@triton.jit
def _fwd_kernel(x, g, w, y, rstd, R, V, eps, BR: tl.constexpr, BV: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols, off, m = _tile(rows, R, V, BV)
    xv = tl.load(x + off, mask=m, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(xv * xv, 1) / V + eps)
    gv = tl.load(g + off, mask=m, other=0.0).to(tl.float32)
    wv = tl.load(w + cols, mask=cols < V, other=0.0).to(tl.float32)
    out = xv * r[:, None] * wv[None, :] * gv * tl.sigmoid(gv)
    tl.store(y + off, out.to(y.dtype.element_ty), mask=m)
    tl.store(rstd + rows, r, mask=rows < R)


@triton.jit
def _bwd_kernel(x, g, w, rstd, dy, dx, dg, dw_part, R, V, BR: tl.constexpr, BV: tl.constexpr):
    i = tl.program_id(0)
    rows = i * BR + tl.arange(0, BR)
    cols, off, m = _tile(rows, R, V, BV)
    xv = tl.load(x + off, mask=m, other=0.0).to(tl.float32)
    gv = tl.load(g + off, mask=m, other=0.0).to(tl.float32)
    wv = tl.load(w + cols, mask=cols < V, other=0.0).to(tl.float32)
    r = tl.load(rstd + rows, mask=rows < R, other=0.0)
    d = tl.load(dy + off, mask=m, other=0.0).to(tl.float32)
    n = xv * r[:, None]
    sig = tl.sigmoid(gv)
    s = gv * sig
    tl.store(dg + off, (d * n * wv[None, :] * sig * (1 + gv * (1 - sig))).to(dg.dtype.element_ty), mask=m)
    dn = d * s * wv[None, :]
    # n = x r with r = (mean(x^2) + eps)^-1/2:  dx = r (dn - n mean(dn n))
    ddx = r[:, None] * (dn - n * (tl.sum(dn * n, 1) / V)[:, None])
    tl.store(dx + off, ddx.to(dx.dtype.element_ty), mask=m)
    tl.store(dw_part + i * V + cols, tl.sum(d * s * n, 0), mask=cols < V)


def _blocks(V: int):
    BV = triton.next_power_of_2(max(V, 16))
    return max(1, 4096 // BV), BV  # a tile of about 4096 values


class GatedRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, weight, eps):
        V = x.shape[-1]
        xr, gr = x.reshape(-1, V).contiguous(), gate.reshape(-1, V).contiguous()
        R = len(xr)
        dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), gate.dtype)
        y = torch.empty(R, V, device=x.device, dtype=dtype)
        rstd = torch.empty(R, device=x.device, dtype=torch.float32)
        BR, BV = _blocks(V)
        if R:
            _fwd_kernel[(triton.cdiv(R, BR),)](xr, gr, weight.contiguous(), y, rstd, R, V, eps, BR, BV)
        ctx.save_for_backward(xr, gr, weight, rstd)
        ctx.shapes = x.shape, gate.shape
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        xr, gr, weight, rstd = ctx.saved_tensors
        R, V = xr.shape
        BR, BV = _blocks(V)
        dx, dg = torch.empty_like(xr), torch.empty_like(gr)
        dw_part = torch.empty(triton.cdiv(R, BR), V, device=xr.device, dtype=torch.float32)  # all written
        if R:
            dyr = dy.reshape(R, V).contiguous()
            _bwd_kernel[(triton.cdiv(R, BR),)](xr, gr, weight.contiguous(), rstd, dyr, dx, dg, dw_part, R, V, BR, BV)
        x_shape, g_shape = ctx.shapes
        return dx.view(x_shape), dg.view(g_shape), dw_part.sum(0).to(weight.dtype), None


def gated_rms_norm(x: Tensor, gate: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """x (..., H, V), gate (..., H * V), weight (V,) -> (..., H * V); see `reference.gated_rms_norm`."""
    return GatedRMSNormFunction.apply(x, gate, weight, eps)
