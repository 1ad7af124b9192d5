"""Triton kernels for MoM's weighted combination of the (token, memory) pairs' outputs; the reference is
`reference.combine`.

Each token r sums the outputs of its A pairs, out[r] = sum_a weight[r, a] * o[slots[r, a]]. In PyTorch
that is a gather of every pair's row, a product in fp32 and a sum (three passes over the pairs, with an
fp32 copy of them), and a backward of as many again. Here the forward reads each pair's row once and
writes each token's row once; the backward reads the output's gradient and the pairs' rows once, writes
each pair's gradient to its own row (every pair has exactly one slot, so there are no collisions and no
atomics) and each weight's gradient, a dot product of two rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .env import interpreting

interpreting()  # its loops have runtime bounds
Tensor = torch.Tensor


@triton.jit
def _fwd_kernel(o, slots, weight, out, R, C, A: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    rm = rows < R
    m = rm[:, None] & (cols < C)[None, :]
    acc = tl.zeros((BR, BC), dtype=tl.float32)
    for a in tl.static_range(A):
        s = tl.load(slots + rows * A + a, mask=rm, other=0)
        w = tl.load(weight + rows * A + a, mask=rm, other=0.0).to(tl.float32)
        acc += tl.load(o + s[:, None] * C + cols[None, :], mask=m, other=0.0).to(tl.float32) * w[:, None]
    tl.store(out + rows[:, None] * C + cols[None, :], acc.to(out.dtype.element_ty), mask=m)


@triton.jit
def _bwd_kernel(o, slots, weight, dout, do, dweight, R, C, A: tl.constexpr, BR: tl.constexpr,
                BC: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rm = rows < R
    for a in tl.static_range(A):
        s = tl.load(slots + rows * A + a, mask=rm, other=0)
        w = tl.load(weight + rows * A + a, mask=rm, other=0.0).to(tl.float32)
        dot = tl.zeros((BR,), dtype=tl.float32)
        for c0 in range(0, C, BC):
            cols = c0 + tl.arange(0, BC)
            m = rm[:, None] & (cols < C)[None, :]
            d = tl.load(dout + rows[:, None] * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
            tl.store(do + s[:, None] * C + cols[None, :], (d * w[:, None]).to(do.dtype.element_ty), mask=m)
            dot += tl.sum(tl.load(o + s[:, None] * C + cols[None, :], mask=m, other=0.0).to(tl.float32) * d, 1)
        tl.store(dweight + rows * A + a, dot, mask=rm)


def _blocks(C: int):
    BC = min(triton.next_power_of_2(max(C, 16)), 128)
    return 4096 // BC, BC  # a tile of 4096 values


class CombineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, slots, weight, dtype):
        P, C = o.shape
        R, A = slots.shape
        if P != R * A:
            raise ValueError(f"slots ({R} x {A}) must list each of the {P} rows of o exactly once")
        o, slots, weight = o.contiguous(), slots.contiguous(), weight.contiguous()
        out = torch.empty(R, C, device=o.device, dtype=dtype)
        BR, BC = _blocks(C)
        if R and C:
            _fwd_kernel[(triton.cdiv(R, BR), triton.cdiv(C, BC))](o, slots, weight, out, R, C, A, BR, BC)
        ctx.save_for_backward(o, slots, weight)
        return out

    @staticmethod
    def backward(ctx, dout):
        o, slots, weight = ctx.saved_tensors
        (R, A), C = slots.shape, o.shape[1]
        do = torch.empty_like(o)
        dweight = torch.empty(R, A, device=o.device, dtype=torch.float32)
        BR, BC = _blocks(C)
        if R and C:
            _bwd_kernel[(triton.cdiv(R, BR),)](o, slots, weight, dout.contiguous(), do, dweight, R, C, A, BR, BC)
        else:
            do.zero_()
            dweight.zero_()
        return do, None, dweight.to(weight.dtype), None


def combine(o: Tensor, slots: Tensor, weight: Tensor, dtype=None) -> Tensor:
    """o (P, C), slots (R, A), weight (R, A) -> (R, C); see `reference.combine`."""
    return CombineFunction.apply(o, slots, weight, dtype or o.dtype)
