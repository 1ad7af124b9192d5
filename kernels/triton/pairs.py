"""Triton kernels that pack MoM's (token, memory) pairs into segments; the reference is
`reference.pack_pairs`, which sorts.

The packing is a counting sort, two launches with a cumulative sum between them:
1. `_count_kernel`, one program per sequence: how many of its tokens each memory got (a token's k
   memories are distinct, so a memory takes at most one pair of a token). The shared memory's count is
   the sequence length.
2. `cu` = the cumulative sum of those counts, memory-major: the segments' offsets.
3. `_place_kernel`, one program per sequence, walking its tokens in order: a pair's place is its segment's
   offset plus the number of earlier tokens of the sequence routed to the same memory (a cumulative sum
   over the block plus a carry from the blocks before), which is also its position in the segment.

At MQAR size the layer is bound by the host's enqueue, and the sort-based reference with what surrounded
it took about 40 small device operations; this takes three. Every token's memories must be distinct
(top-k's are) and in [0, num_memories): the kernels do not check them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .env import interpreting

interpreting()  # its loops have runtime bounds
Tensor = torch.Tensor


@triton.jit
def _load_routes(index, b, t0, T, K: tl.constexpr, E: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr,
                 BT: tl.constexpr):
    """Tokens t0..t0+BT of sequence b: their flat rows, validity, the (token, slot, memory) match and the
    (token, memory) hits."""
    t = t0 + tl.arange(0, BT)
    j = tl.arange(0, KP)
    e = tl.arange(0, EP)
    valid = t < T
    row = b * T + t
    idx = tl.load(index + row[:, None] * K + j[None, :], mask=valid[:, None] & (j < K)[None, :], other=-1)
    match = idx[:, :, None] == e[None, None, :]  # (BT, KP, EP)
    hit = tl.sum(match.to(tl.int32), 1)  # (BT, EP): 0 or 1, the memories are distinct
    return t, row, valid, match, hit


@triton.jit
def _count_kernel(index, cu, T, B, K: tl.constexpr, E: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr,
                  SHARED: tl.constexpr, BT: tl.constexpr):
    """cu[1 + e*B + b] = the number of sequence b's tokens routed to memory e (T for the shared one)."""
    b = tl.program_id(0)
    e = tl.arange(0, EP)
    n = tl.zeros([EP], dtype=tl.int32)
    for t0 in range(0, T, BT):
        _, _, _, _, hit = _load_routes(index, b, t0, T, K, E, KP, EP, BT)
        n += tl.sum(hit, 0)
    tl.store(cu + 1 + e * B + b, n, mask=e < E)
    if SHARED:
        tl.store(cu + 1 + E * B + b, T)
    if b == 0:
        tl.store(cu, 0)


@triton.jit
def _place_kernel(index, cu, tok, slots, pos, T, B, K: tl.constexpr, E: tl.constexpr, KP: tl.constexpr,
                  EP: tl.constexpr, SHARED: tl.constexpr, BT: tl.constexpr):
    b = tl.program_id(0)
    j = tl.arange(0, KP)
    e = tl.arange(0, EP)
    A: tl.constexpr = K + SHARED
    start = tl.load(cu + e * B + b, mask=e < E, other=0)  # (EP,) each memory's segment of sequence b
    carry = tl.zeros([EP], dtype=tl.int32)  # pairs of the earlier blocks, per memory
    for t0 in range(0, T, BT):
        t, row, valid, match, hit = _load_routes(index, b, t0, T, K, E, KP, EP, BT)
        rank = tl.cumsum(hit, 0) - hit + carry[None, :]  # (BT, EP) earlier tokens routed to each memory
        carry += tl.sum(hit, 0)
        r = tl.sum(tl.where(match, rank[:, None, :], 0), 2)  # (BT, KP) each pair's position ...
        at = tl.sum(tl.where(match, (start[None, :] + rank)[:, None, :], 0), 2)  # ... and its place
        m = valid[:, None] & (j < K)[None, :]
        tl.store(slots + row[:, None] * A + j[None, :], at, mask=m)
        tl.store(tok + at, row[:, None] + 0 * j[None, :], mask=m)
        tl.store(pos + at, r, mask=m)
        if SHARED:  # the shared memory's pairs follow every routed pair, in token order
            at_s = B * T * K + row
            tl.store(slots + row * A + K, at_s, mask=valid)
            tl.store(tok + at_s, row, mask=valid)
            tl.store(pos + at_s, t, mask=valid)


def pack_pairs(index: Tensor, num_memories: int, shared: bool):
    """See `reference.pack_pairs`: the same results, in the same dtypes."""
    B, T, k = index.shape
    E, dev = num_memories, index.device
    P = B * T * (k + int(shared))
    index = index.contiguous()
    cu = torch.empty((E + int(shared)) * B + 1, device=dev, dtype=torch.int32)
    tok = torch.empty(P, device=dev, dtype=torch.long)
    slots = torch.empty(B * T, k + int(shared), device=dev, dtype=torch.long)
    pos = torch.empty(P, device=dev, dtype=torch.long)
    KP, EP = max(2, triton.next_power_of_2(k)), max(2, triton.next_power_of_2(E))
    BT = max(16, min(triton.next_power_of_2(T), 2048 // (KP * EP)))  # a (BT, KP, EP) match of 2048
    kw = dict(K=k, E=E, KP=KP, EP=EP, SHARED=bool(shared), BT=BT)
    if B * T == 0:
        return tok, slots, cu.zero_(), pos
    _count_kernel[(B,)](index, cu, T, B, **kw)
    cu = cu.cumsum(0, dtype=torch.int32)
    _place_kernel[(B,)](index, cu, tok, slots, pos, T, B, **kw)
    return tok, slots, cu, pos
