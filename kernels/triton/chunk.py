"""The chunked memory recurrence of `reference` on Triton, forward and backward: the host side (block
sizes, chunk layout, the plan of a call, autograd, the backward's groups) of the kernels in chunk_fwd.py
and chunk_bwd.py. One module of about 500 lines: tests and benchmarks patch names that its parts look up
at call time (`CONFIG_OVERRIDES`, `_max_shared_mem`, `WORKSPACE_BYTES`, `_keep`, the kernels, ...).

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
sub-chunk at a time, exact (`jit._pair_channel`).
"""
from __future__ import annotations

import copy
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import MAX_HEAD_DIM, reference as _reference
from .chunk_bwd import _dh_bwd_kernel, _dqk_bwd_kernel, _dv_bwd_kernel, _dvn_intra_kernel
from .chunk_fwd import _h_fwd_kernel, _o_fwd_kernel, _prep_kernel
from .jit import INTERPRET

Tensor = torch.Tensor


# Test and tuning hook: entries here replace those of every `_config` result (e.g. BK=16 so that the
# K-block loops run more than once at the interpreter's tiny shapes).
CONFIG_OVERRIDES: dict = {}


def _config(K: int, V: int, chunk_size: int) -> dict:
    """Fixed block sizes (the interpreter cannot autotune; every value and its measurement: TUNING.md).

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
        # prep: 4 warps (faster than 8), 8 for the per-channel decay (its sub-chunk pairs need more
        # registers); dq/dk 8 with its L2 hints (TUNING.md)
        warps_prep=4,
        warps_prep_channel=8,
        warps_h=4,      # h, dh
        warps_dqk=8,
        stages=1,
        # With bf16 operands (`_Plan.dot16`) the sequential kernels are pipelined over 2 stages (the next
        # chunk's loads in flight during this one's products; TUNING.md). fp32 operands take twice the
        # shared memory, over the H100's 227 KB at K = 256, and so do the per-channel decay's extra tiles
        # in the reverse kernel. The other kernels gained nothing measurable from 2 stages.
        # Above K = 256 one stage: at K = 512 two stages of a per-channel decay take more shared memory
        # than Hopper has (kernels/triton/TUNING.md).
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
    memories' 128; TUNING.md).

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
# what a Hopper GPU (227 KB) has, an A100 (163 KB) not (TUNING.md).
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
        # tf32, which the sequential passes, bound by their chain of steps, gain from (TUNING.md).
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
# Fewer groups are faster, one group peaks highest: 768 MB runs the MoM layer at B8 x T2048 in 2 groups,
# under flash-linear-attention's peak memory (TUNING.md).
WORKSPACE_BYTES = 768 * 2 ** 20
MIN_CHAINS = 32
# The forward keeps, within KEEP_BYTES, what the backward would recompute. When the backward runs as one
# group: all of it if it fits (then the backward runs neither prep nor the sequential pass), else the
# chunk states and v_new. Those are the sequential pass's output, whose run time is set by the chain
# length, not the work: with few long segments (B1 x T16384: 20 chains of up to 256 chunks) that pass
# takes about a fifth of the MoM layer's time, and recomputing it costs as much again. At small sizes
# (MQAR) keeping prep's output saves a launch and its work. 768 MB keeps all of it at B1 x T16384 too.
# In groups, the chunk states (the bulk of a group's workspace) are not kept, but prep's output and v_new
# are: arrays of token rows, of which each group reads its slice. A group then runs only the sequential
# pass, and that from v_new, which takes W h off its chain of steps; those rows stay alive through all
# groups, which raises the peak (TUNING.md).
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


__all__ = ["chunk", "ChunkMemoryFunction"]
