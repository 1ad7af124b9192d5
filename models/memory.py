"""Recurrent-memory mixers: linear attention, GLA, Mamba-2, DeltaNet, Gated DeltaNet, KDA, RetNet, Hedgehog,
(Gated) DeltaProduct, and MoM.

They are one module. A mixer holds M memories; each memory has its own key, value and gate projections
and runs the shared core (`mom_bench.kernels.chunk`) over the tokens it sees. Everything else is
shared: the query projection, the short convolution (one over the q | k | v channels), the decay
parameters, the gated output norm and the output projection.

- num_memories = 0: one memory sees every token. This is the plain mixer of the chosen `kind`.
- num_memories = E > 0: Mixture-of-Memories. A router sends each token to its top-k of E memories,
  weighted by its renormalised router probabilities; with `shared_memory` one more memory sees every
  token with weight 1. A memory that gets no token at a step is left untouched: no update, no decay.

Training packs the (token, memory) pairs into contiguous segments, one per (memory, sequence), ordered
by memory, then sequence, then time (the sort key is unique, so time order is guaranteed, not hoped
for); one grouped product projects every memory's pairs by that memory's matrix; the short convolution
runs inside each segment; one varlen core call covers every memory; each token gathers its pairs' outputs
and sums them, weighted. None of it waits for the GPU (no host sync).
`step` does the same for one token with explicit state, and computes the same function (tested).
`prefill` is the parallel form that also returns that state (each segment's final memory state and its
convolution tails), so decoding a prompt costs one parallel pass, not one step per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..kernels import combine, pack_pairs
from .layers import GatedHeadNorm, ShortConv, inverse_softplus, upcast

Tensor = torch.Tensor


class Pairs(NamedTuple):
    """A batch's (token, memory) pairs, packed (see `MemoryMixer._layout`)."""
    tok: Tensor  # (P,) the token of every pair
    cu: Tensor  # (M * B + 1,) cu_seqlens of the (memory, sequence) segments
    ends: Tensor  # (M,) int32: where each memory's pairs end (the offsets of the grouped projection)
    slots: Tensor  # (B * T, A) the pairs of every token: its top-k routed memories, then the shared one
    weight: Tensor  # (B * T, A) their output weights
    pos: Tensor  # (P,) each pair's position in its segment
    aux: Tensor  # the load-balancing loss


class _Gather(torch.autograd.Function):
    """Rows x[index], where every row of x is copied to exactly the r rows that inverse (len(x), r) lists.
    The backward is then a gather and a sum over r: deterministic, and much faster than index_select's
    atomic index_add in bf16."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        rows = grad.index_select(0, inverse.flatten()).view(*inverse.shape, *grad.shape[1:])
        return (rows[:, 0] if inverse.shape[1] == 1 else rows.sum(1)), None, None


def grouped_mm(x: Tensor, w: Tensor, ends: Tensor) -> Tensor:
    """x (N, D), w (G, D, C), ends (G,) int32: rows ends[g-1]:ends[g] of x times w[g], as one (N, C). One
    fused product in 16-bit (no host sync, and no per-shape GEMM planning on the host, which costs about
    0.1 ms a call when every call brings new row counts); in fp32 torch's own fallback (on CUDA it copies
    ends to the host); a loop in fp64 (the tests). Under
    autocast both operands are cast as for a matmul: autocast itself leaves this op in fp32."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    if x.dtype in (torch.bfloat16, torch.float16, torch.float32):
        return torch._grouped_mm(x, w, offs=ends)
    sizes = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
    return torch.cat([xg @ wg for xg, wg in zip(x.split(sizes), w)])


@dataclass(frozen=True)
class Kind:
    """How one memory writes: its decay, its write strength, delta rule, and what comes before the core."""
    # None | "fixed" (RetNet: log(1 - 2^(-5-h)) for head h, not learned) | "head" (Mamba's
    # -exp(A_log) softplus(a + dt_bias) per head) | "channel" (GLA's logsigmoid(a) / 16 per channel) |
    # "channel_dt" (KDA: Mamba's gate per channel, A_log per head and dt_bias per channel)
    decay: Optional[str]
    beta: Optional[str]  # None | "sigmoid" (a learned gate) | "dt" (Mamba-2: the step size scales the input)
    delta: bool
    normalize_qk: bool  # L2-normalised q and k keep the delta rule's (I - beta k k^T) contractive
    skip: bool = False  # Mamba-2's D * x term
    feature_map: Optional[str] = None  # "hedgehog": softmax([x W + b, -(x W + b)]) per head on q and k
    householder: bool = False  # DeltaProduct: `householder_steps` keys, values and betas per token


KINDS: Dict[str, Kind] = {
    "linear": Kind(decay=None, beta=None, delta=False, normalize_qk=False),
    "gla": Kind(decay="channel", beta=None, delta=False, normalize_qk=False),
    "mamba2": Kind(decay="head", beta="dt", delta=False, normalize_qk=False, skip=True),
    "delta": Kind(decay=None, beta="sigmoid", delta=True, normalize_qk=True),
    "gated_delta": Kind(decay="head", beta="sigmoid", delta=True, normalize_qk=True),
    "kda": Kind(decay="channel_dt", beta="sigmoid", delta=True, normalize_qk=True),
    "retnet": Kind(decay="fixed", beta=None, delta=False, normalize_qk=False),
    "hedgehog": Kind(decay=None, beta=None, delta=False, normalize_qk=False, feature_map="hedgehog"),
    "delta_product": Kind(decay="head", beta="sigmoid", delta=True, normalize_qk=True, householder=True),
}


class MemoryMixer(nn.Module):
    def __init__(self, d_model: int, num_heads: int = 1, head_dim: Optional[int] = None,
                 kind: str = "gated_delta", num_memories: int = 0, topk: int = 2, shared_memory: bool = True,
                 conv_size: int = 4, chunk_size: int = 64, aux_loss_coef: float = 0.01,
                 negative_eigenvalues: bool = False, householder_steps: int = 2, d_state: Optional[int] = None,
                 **_):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"memory kind must be one of {sorted(KINDS)}, got {kind!r}")
        if num_memories and not 1 <= topk <= num_memories:
            raise ValueError(f"topk must be in [1, num_memories={num_memories}], got {topk}")
        self.kind = KINDS[kind]
        # beta = 2 sigmoid(b) in (0, 2) (arXiv 2411.12537): the eigenvalue 1 - beta of (I - beta k k^T) along
        # k then reaches into (-1, 0), which state tracking needs; without the delta rule beta only scales a write
        if negative_eigenvalues and not self.kind.delta:
            raise ValueError(f"negative_eigenvalues needs a delta-rule memory kind "
                             f"({', '.join(n for n, k in KINDS.items() if k.delta)}), got {kind!r}")
        if self.kind.householder and householder_steps < 1:
            raise ValueError(f"householder_steps must be at least 1, got {householder_steps}")
        self.negative_eigenvalues = negative_eigenvalues
        # DeltaProduct runs each token as n sub-tokens of the core (n = 1 for every other kind)
        self.n = householder_steps if self.kind.householder else 1
        self.d_model, self.H = d_model, num_heads
        # The value dim V is the head dim; the key dim K (q and k per head: Mamba-2's C and B, the width of
        # GLA's and KDA's per-channel decays, Hedgehog's map input) is d_state, else the head dim. The core
        # takes q, k (.., H, K) and v (.., H, V) apart, so every kind takes K != V; the state is H x K x V.
        if d_state is not None and d_state < 1:
            raise ValueError(f"model.d_state (the key dim per head) must be positive, got {d_state}")
        self.V = head_dim or d_model // num_heads
        self.K = d_state or self.V
        self.Kf = 2 * self.K if self.kind.feature_map else self.K  # the state's key dim: Hedgehog doubles it
        head = f"head_dim, else d_model / num_heads = {d_model} / {num_heads}"
        key = ("key dim" if d_state else "head dim", "model.d_state" if d_state else head)
        if self.kind.feature_map:
            key = (f"twice the {key[0]} (Hedgehog's features)", key[1])
        for (what, of), dim in ((("head dim", head), self.V), (key, self.Kf)):
            if dim > kernels.MAX_HEAD_DIM:
                raise ValueError(f"{what} {dim} ({of}) exceeds the {kernels.MAX_HEAD_DIM} that the Triton kernels take")
        self.routed, self.topk = num_memories, topk
        self.shared = shared_memory or num_memories == 0
        self.M = self.routed + int(self.shared)
        self.chunk_size, self.aux_loss_coef = chunk_size, aux_loss_coef
        H, K, V, M, D = self.H, self.K, self.V, self.M, d_model

        def per_memory(out: int) -> nn.Parameter:  # (M, D, out), initialised like nn.Linear
            return nn.Parameter(torch.empty(M, D, out).uniform_(-D ** -0.5, D ** -0.5))

        # Every input projection of a memory is one matrix, columns q | k | v | a (decay or step size) |
        # b (write strength), so a memory's tokens take one product; q's columns are shared by all memories.
        # DeltaProduct's n keys, values and betas of a token lie side by side: columns (n, H, K), (n, H, V), (n, H).
        learned = self.kind.decay not in (None, "fixed") or self.kind.beta == "dt"
        n_a = (H * K if self.kind.decay in ("channel", "channel_dt") else H) if learned else 0
        n = self.n
        self.widths = (H * K, n * H * K, n * H * V, n_a, n * H if self.kind.beta == "sigmoid" else 0)
        self.w_q = nn.Parameter(torch.empty(D, H * K).uniform_(-D ** -0.5, D ** -0.5))
        self.w_in = per_memory(sum(self.widths[1:]))
        self.register_buffer("pad", torch.zeros(M, D, -sum(self.widths) % 16), persistent=False)  # `_in_weights`
        if self.kind.decay in ("head", "channel_dt"):  # Mamba-style decay parameters, shared by all memories
            self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
            dt = torch.exp(torch.empty(n_a).uniform_(math.log(1e-3), math.log(1e-1)))  # KDA: one per channel
            self.dt_bias = nn.Parameter(inverse_softplus(dt))
        if self.kind.feature_map:  # Hedgehog: a map for q and one for k, per head, shared by all memories
            self.fm_weight = nn.Parameter(torch.eye(K).repeat(2, H, 1, 1))  # (q | k, H, K, K): identity at init
            self.fm_bias = nn.Parameter(torch.zeros(2, H, K))
        if self.kind.skip:
            self.D_skip = nn.Parameter(torch.ones(H))
        # One convolution over the q | k | v columns (one launch, its output split into the three arrays)
        self.conv = ShortConv(sum(self.widths[:3]), conv_size) if conv_size else None
        self.router = nn.Linear(D, num_memories, bias=False) if self.routed else None
        self.gate = nn.Linear(D, H * V, bias=False)
        self.norm = GatedHeadNorm(V)
        self.out = nn.Linear(H * V, D, bias=False)

    # --- pieces shared by forward and step -------------------------------------------------------
    def _route(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Router probabilities (fp32) and the top-k memories with renormalised weights."""
        probs = upcast(self.router(x)).softmax(-1)
        weight, index = probs.topk(self.topk, -1)
        if getattr(self, "router_stats", None) is not None:  # set by mom_bench.router_stats.collect only
            self.router_stats.add(probs.detach(), index.detach())  # device-side sums: no host sync
        return probs, weight / weight.sum(-1, keepdim=True), index

    def _in_weights(self, dtype) -> Tensor:
        """(M, D, q|k|v|a|b columns, zero-padded to a multiple of 16): every memory's input projection. The
        grouped product needs rows of a multiple of 16 bytes, and the convolution reads q|k|v with
        vectorised loads only when its rows are a multiple of 16 elements apart."""
        return torch.cat([self.w_q.expand(self.M, self.d_model, -1), self.w_in, self.pad], -1).to(dtype)

    def _split(self, proj: Tensor, front: int = 3) -> Tuple[Tensor, ...]:
        """(the columns of the last `front` of q, k, v as one array, a, b) from projected rows that start
        with those: q|k|v (front 3), k|v (2: `step`, whose q is apart) or none (0: the columns the
        convolution hands back). An input the kind does not use is None; padding columns are dropped."""
        widths = self.widths[3 - front:]
        parts = proj.split([sum(widths[:front]), *widths[front:], proj.shape[-1] - sum(widths)], -1)
        return (parts[0],) + tuple(t if t.shape[-1] else None for t in parts[1:-1])

    def fixed_decay(self, like: Tensor) -> Tensor:
        """RetNet's log decay per head, log(1 - 2^(-5-h)) for h = 0 .. H-1, in like's (upcast) dtype."""
        h = torch.arange(self.H, device=like.device, dtype=upcast(like).dtype)
        return torch.log1p(-torch.exp2(-5 - h))

    def _gates(self, a: Optional[Tensor], b: Optional[Tensor], k: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Log decay g and write strength beta from the projections (k: the key rows, for the shape of a fixed
        decay), per token: g (..., H) or (..., H, K), beta (..., n * H)."""
        kind, g, beta = self.kind, None, None
        if kind.decay == "fixed":
            g = self.fixed_decay(k).expand(*k.shape[:-1], self.H).contiguous()
        elif kind.decay == "channel":
            g = F.logsigmoid(upcast(a)).unflatten(-1, (self.H, self.K)) / 16  # GLA's gate normaliser
        elif a is not None:
            dt = F.softplus(upcast(a) + self.dt_bias)  # (..., H), or (..., H * K) for KDA
            if kind.decay == "head":
                g = -self.A_log.exp() * dt
            elif kind.decay == "channel_dt":
                g = -self.A_log.exp()[:, None] * dt.unflatten(-1, (self.H, self.K))
            beta = dt if kind.beta == "dt" else None
        if kind.beta == "sigmoid":
            beta = upcast(b).sigmoid() * (2 if self.negative_eigenvalues else 1)
        return g, beta

    def _features(self, q: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
        """Hedgehog's feature maps on q and k rows (..., H * K) -> (..., H * 2K): per head, softmax over the 2K
        features [x W + b, -(x W + b)]; the identity for the other kinds. The softmax makes q.k positive;
        its normaliser (the sum of q.k over the past) is not needed: the gated RMSNorm after the core
        divides each head's output by its own scale anyway."""
        if not self.kind.feature_map:
            return q, k
        out = []
        for x, w, bias in zip((q, k), self.fm_weight, self.fm_bias):
            y = torch.einsum("...hk,hkf->...hf", x.unflatten(-1, (self.H, self.K)), w.to(x.dtype)) + bias.to(x.dtype)
            out.append(torch.cat([y, -y], -1).softmax(-1).flatten(-2))
        return out[0], out[1]

    def _sub_tokens(self, q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor],
                    beta: Optional[Tensor]) -> Tuple[Tensor, ...]:
        """DeltaProduct (arXiv 2502.10297): rows (P, ...) of n keys, values and betas each -> (P * n, ...) sub-tokens
        in time order, so that the core applies n delta-rule (Householder) steps per token: the decay on
        the first sub-token only, and the output read at the last (q is repeated; the other sub-tokens'
        outputs are dropped). The identity for n = 1."""
        n = self.n
        if n == 1:
            return q, k, v, g, beta
        P = q.shape[0]
        q = q[:, None].expand(P, n, *q.shape[1:]).flatten(0, 1)
        k, v, beta = (None if t is None else t.reshape(P * n, t.shape[-1] // n) for t in (k, v, beta))
        if g is not None:
            g = torch.cat([g[:, None], g.new_zeros(P, n - 1, *g.shape[1:])], 1).flatten(0, 1)
        return q, k, v, g, beta

    def _conv(self, proj: Tensor, pos: Tensor) -> Tuple[Optional[Tensor], ...]:
        """q, k, v (convolved) and a, b (as `_split`) from projected rows."""
        if self.conv is None:
            qkv, a, b = self._split(proj)
            return (*qkv.split(self.widths[:3], -1), a, b)
        # The convolution takes the whole rows and hands back their columns past q|k|v, so that the rows'
        # gradient is one array its backward writes: split apart here, the gradients of the pieces would
        # be concatenated, a copy of all of them (0.27 ms of the MoM layer at B8 x T2048 on an H100).
        ys = self.conv(proj, pos, self.widths[:3])
        _, a, b = self._split(ys[3] if len(ys) > 3 else proj[:, :0], front=0)
        return (*ys[:3], a, b)

    def _finish(self, o: Tensor, x: Tensor) -> Tensor:
        return self.out(self.norm(o.to(x.dtype), self.gate(x)))

    # --- training: packed segments, one core call -----------------------------------------------
    def _layout(self, xf: Tensor, B: int, T: int) -> Pairs:
        """The (token, memory) pairs of a MoM batch xf (B * T, D), packed (`pack_pairs`): routed pairs
        grouped by memory, then sequence, then time, then the shared memory's (every token, in order). No
        host sync."""
        E = self.routed
        probs, weight, index = self._route(xf)
        tok, slots, cu, pos = pack_pairs(index.view(B, T, -1), E, self.shared)
        bounds = cu[::B]  # (M + 1,) where each memory's pairs start, and the end
        # Switch/Mixtral load balancing: E * sum_e (fraction of routed slots to e) * (mean prob of e)
        per_memory = torch.diff(bounds[:E + 1]).to(probs.dtype)  # pairs of each routed memory
        aux = self.aux_loss_coef * E / index.numel() * torch.dot(per_memory, probs.mean(0))
        if self.shared:  # weight 1 for the shared memory
            weight = F.pad(weight, (0, 1), value=1.0)
        return Pairs(tok, cu, bounds[1:].contiguous(), slots, weight, pos, aux)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        y, aux, _ = self._parallel(x, want_state=False)
        return y, aux

    def prefill(self, x: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The parallel form over a prompt, plus the state `step` continues from: each memory's final
        recurrent state per sequence and the last (conv_size - 1) inputs of each of its convolutions."""
        y, _, state = self._parallel(x, want_state=True)
        return y, state

    def _parallel(self, x: Tensor, want_state: bool) -> Tuple[Tensor, Tensor, Optional[Dict[str, Tensor]]]:
        B, T, D = x.shape
        H, V = self.H, self.V
        xf = x.reshape(B * T, D)
        w = self._in_weights(x.dtype)
        if self.routed:  # every pair's token row, then one grouped product: each memory's rows by its matrix
            pairs = self._layout(xf, B, T)
            cu, pos, aux = pairs.cu, pairs.pos, pairs.aux
            proj = grouped_mm(_Gather.apply(xf, pairs.tok, pairs.slots), w, pairs.ends)
        else:  # one memory over every token in order: the pairs are the tokens themselves
            cu = torch.arange(B + 1, device=x.device) * T
            pos = torch.arange(T, device=x.device).repeat(B)
            aux = x.new_zeros((), dtype=torch.float32)
            proj = xf @ w[0]
        q, k, v, a, b = self._conv(proj, pos)
        g, beta = self._gates(a, b, k)
        n, Kf = self.n, self.Kf
        qf, kf, vf, g, beta = self._sub_tokens(*self._features(q, k), v, g, beta)
        # MoM: one packed batch of segments; a plain mixer: its B sequences as they are (no cu_seqlens, so
        # the core knows the segments on the host). One view per tensor: each is a node of the backward.
        seqs = (1, n * len(proj)) if self.routed else (B, n * T)
        rows = lambda t, *d: None if t is None else t.view(*seqs, *(d or t.shape[1:]))
        o, final = kernels.chunk(rows(qf, H, Kf), rows(kf, H, Kf), rows(vf, H, V), g=rows(g), beta=rows(beta),
                             delta=self.kind.delta, cu_seqlens=(cu * n if n > 1 else cu) if self.routed else None,
                             normalize_qk=self.kind.normalize_qk, chunk_size=self.chunk_size)
        # Each token's output is its last sub-token's. For n = 1 a view of the Triton core's output (the
        # reference's is transposed, and reshaped into a copy).
        o = o.reshape(len(proj), n, H, V)[:, -1].contiguous()
        if self.kind.skip:
            o = upcast(o) + self.D_skip[:, None] * upcast(v).unflatten(-1, (H, V))
        if self.routed:  # each token's memories, weighted, summed in fp32
            o = combine(o.view(len(proj), H * V), pairs.slots, pairs.weight, x.dtype).view(B * T, H, V)
        y = self._finish(o, xf).view(B, T, D)
        if not want_state:
            return y, aux, None
        # Segments are ordered memory-major (memory, sequence): M * B of them, some possibly empty, whose
        # final state is then the zero initial state, as for a memory that was never routed to.
        state = {"S": final.view(self.M, B, H, Kf, V).transpose(0, 1).contiguous()}
        if self.conv is not None:
            tail = self.conv.tail(proj[:, :sum(self.widths[:3])], cu)  # (M * B, width - 1, C)
            state["conv"] = tail.view(self.M, B, *tail.shape[1:]).transpose(0, 1).contiguous()
        return y, aux, state

    # --- decoding: one token, explicit state -----------------------------------------------------
    def init_state(self, batch: int, device, dtype=torch.float32) -> Dict[str, Tensor]:
        state = {"S": torch.zeros(batch, self.M, self.H, self.Kf, self.V, device=device,
                                 dtype=torch.promote_types(dtype, torch.float32))}
        if self.conv is not None:
            state["conv"] = self.conv.init_state(batch, device, dtype)[:, None].repeat(1, self.M, 1, 1)
        return state

    def _select(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """The memories a token (B, D) updates, (B, A), and their output weights: its top-k routed memories
        with renormalised weights, then the shared memory with weight 1. Indices in a row are distinct."""
        index, weight = [], []
        if self.routed:
            _, w, i = self._route(x)
            index.append(i)
            weight.append(w)
        if self.shared:
            index.append(torch.full((x.shape[0], 1), self.M - 1, device=x.device, dtype=torch.long))
            weight.append(torch.ones(x.shape[0], 1, device=x.device, dtype=upcast(x).dtype))
        return torch.cat(index, 1), torch.cat(weight, 1)

    def step(self, x: Tensor, state: Dict[str, Tensor]) -> Tuple[Tensor, Dict[str, Tensor]]:
        """One token per sequence. Only the selected memories (and their convolution windows) are read and
        written, all of them in one core call (DeltaProduct: one per Householder step), and `state` is updated
        in place and returned: decoding is bound by state traffic, and copying every memory's state per
        token would more than double it."""
        B = x.shape[0]
        H, V = self.H, self.V
        sel, weight = self._select(x)
        A = sel.shape[1]
        flat = (torch.arange(B, device=x.device)[:, None] * self.M + sel).flatten()  # rows of (B * M, ...)
        read = lambda t: t.flatten(0, 1).index_select(0, flat)  # (B, M, ...) -> the selected (B * A, ...)
        write = lambda t, new: t.view(-1, *t.shape[2:]).index_copy_(0, flat, new.to(t.dtype))  # in place
        # Every memory's projections in one batched product (each weight is read once), then the selected;
        # q, the same for every memory, once.
        q = (x @ self.w_q.to(x.dtype)).repeat_interleave(A, 0)
        kv, a, b = self._split(read(torch.einsum("bd,mdn->bmn", x, self.w_in.to(x.dtype))), front=2)
        qkv = torch.cat([q, kv], -1)
        if self.conv is not None:
            qkv, window = self.conv.step(qkv, read(state["conv"]))
            write(state["conv"], window)
        q, k, v = qkv.split(self.widths[:3], -1)
        g, beta = self._gates(a, b, k)
        n, Kf = self.n, self.Kf
        qf, kf, vf, g, beta = self._sub_tokens(*self._features(q, k), v, g, beta)
        qf, kf, vf = qf.unflatten(-1, (H, Kf)), kf.unflatten(-1, (H, Kf)), vf.unflatten(-1, (H, V))
        sub = lambda t, i: None if t is None else t.view(-1, n, *t.shape[1:])[:, i]  # sub-token i of each row
        # The selected states are updated where they lie in the pool: no gathered copy to write back. One
        # step per sub-token (DeltaProduct's Householder steps; one for the other kinds).
        for i in range(n):
            o, _ = kernels.step(sub(qf, i), sub(kf, i), sub(vf, i), state["S"].view(-1, H, Kf, V), g=sub(g, i),
                                beta=sub(beta, i), delta=self.kind.delta, normalize_qk=self.kind.normalize_qk,
                                index=flat)
        o = upcast(o).view(B, A, H, V)
        if self.kind.skip:
            o = o + self.D_skip[:, None] * upcast(v).reshape(B, A, H, V)
        return self._finish((weight[:, :, None, None] * o).sum(1), x), state

    def state_size(self, seq_len: int) -> Dict[str, int]:
        per_memory = self.H * self.Kf * self.V
        active = (self.topk if self.routed else 0) + int(self.shared)
        return {"total": self.M * per_memory, "active": active * per_memory}
