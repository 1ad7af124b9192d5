"""Recurrent-memory mixers: linear attention, GLA, Mamba-2, DeltaNet, Gated DeltaNet, and MoM.

They are one module. A mixer holds M memories; each memory has its own key, value and gate projections
and runs the shared core (`mom_bench.kernels.memory_op`) over the tokens it sees. Everything else is
shared: the query projection, the short convolutions, the decay parameters, the gated output norm and
the output projection.

- num_memories = 0: one memory sees every token. This is the plain mixer of the chosen `kind`.
- num_memories = E > 0: Mixture-of-Memories. A router sends each token to its top-k of E memories,
  weighted by its renormalised router probabilities; with `shared_memory` one more memory sees every
  token with weight 1. A memory that gets no token at a step is left untouched: no update, no decay.

Training packs the (token, memory) pairs into contiguous segments, one per (memory, sequence), ordered
by memory, then sequence, then time (the sort key is unique, so time order is guaranteed, not hoped
for); the short convolutions run inside each segment; one varlen core call covers every memory; the
outputs are scattered back to their tokens. `step` does the same for one token with explicit state,
and computes the same function (tested). `prefill` is the parallel form that also returns that state
(each segment's final memory state and its convolution tails), so decoding a prompt costs one parallel
pass, not one step per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import memory_op, memory_step, segment_positions
from .layers import GatedHeadNorm, ShortConv, inverse_softplus, upcast

Tensor = torch.Tensor


@dataclass(frozen=True)
class Kind:
    """How one memory writes: its decay (None, per head, per channel), its write strength, delta rule."""
    decay: Optional[str]  # None | "head" | "channel"
    beta: Optional[str]  # None | "sigmoid" (a learned gate) | "dt" (Mamba-2: the step size scales the input)
    delta: bool
    normalize_qk: bool  # L2-normalised q and k keep the delta rule's (I - beta k k^T) contractive
    skip: bool = False  # Mamba-2's D * x term


KINDS: Dict[str, Kind] = {
    "linear": Kind(decay=None, beta=None, delta=False, normalize_qk=False),
    "gla": Kind(decay="channel", beta=None, delta=False, normalize_qk=False),
    "mamba2": Kind(decay="head", beta="dt", delta=False, normalize_qk=False, skip=True),
    "delta": Kind(decay=None, beta="sigmoid", delta=True, normalize_qk=True),
    "gated_delta": Kind(decay="head", beta="sigmoid", delta=True, normalize_qk=True),
}


class MemoryMixer(nn.Module):
    def __init__(self, d_model: int, num_heads: int = 1, head_dim: Optional[int] = None,
                 kind: str = "gated_delta", num_memories: int = 0, topk: int = 2, shared_memory: bool = True,
                 conv_size: int = 4, chunk_size: int = 64, aux_loss_coef: float = 0.01, **_):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"memory kind must be one of {sorted(KINDS)}, got {kind!r}")
        if num_memories and not 1 <= topk <= num_memories:
            raise ValueError(f"topk must be in [1, num_memories={num_memories}], got {topk}")
        self.kind = KINDS[kind]
        self.d_model, self.H = d_model, num_heads
        self.K = self.V = head_dim or d_model // num_heads
        self.routed, self.topk = num_memories, topk
        self.shared = shared_memory or num_memories == 0
        self.M = self.routed + int(self.shared)
        self.chunk_size, self.aux_loss_coef = chunk_size, aux_loss_coef
        H, K, V, M, D = self.H, self.K, self.V, self.M, d_model

        def per_memory(out: int) -> nn.Parameter:  # (M, D, out), initialised like nn.Linear
            return nn.Parameter(torch.empty(M, D, out).uniform_(-D ** -0.5, D ** -0.5))

        self.q_proj = nn.Linear(D, H * K, bias=False)
        self.w_k, self.w_v = per_memory(H * K), per_memory(H * V)
        if self.kind.decay or self.kind.beta == "dt":
            self.w_a = per_memory(H * K if self.kind.decay == "channel" else H)
        if self.kind.beta == "sigmoid":
            self.w_b = per_memory(H)
        if self.kind.decay == "head":  # Mamba-style decay parameters, shared by all memories
            self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
            dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)))
            self.dt_bias = nn.Parameter(inverse_softplus(dt))
        if self.kind.skip:
            self.D_skip = nn.Parameter(torch.ones(H))
        self.convs = nn.ModuleList(ShortConv(n, conv_size) for n in (H * K, H * K, H * V)) if conv_size else None
        self.router = nn.Linear(D, num_memories, bias=False) if self.routed else None
        self.gate = nn.Linear(D, H * V, bias=False)
        self.norm = GatedHeadNorm(V)
        self.out = nn.Linear(H * V, D, bias=False)

    # --- pieces shared by forward and step -------------------------------------------------------
    def _route(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Router probabilities (fp32) and the top-k memories with renormalised weights."""
        probs = upcast(self.router(x)).softmax(-1)
        weight, index = probs.topk(self.topk, -1)
        return probs, weight / weight.sum(-1, keepdim=True), index

    def _project(self, x: Tensor, m: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Memory m's key, value and gate pre-activation for tokens x (N, D)."""
        k, v = x @ self.w_k[m].to(x.dtype), x @ self.w_v[m].to(x.dtype)
        a = x @ self.w_a[m].to(x.dtype) if hasattr(self, "w_a") else None
        b = x @ self.w_b[m].to(x.dtype) if hasattr(self, "w_b") else None
        return k, v, a, b

    def _gates(self, a: Optional[Tensor], b: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Log decay g and write strength beta from the projections, per token (..., H) or (..., H, K)."""
        kind, g, beta = self.kind, None, None
        if kind.decay == "channel":
            g = F.logsigmoid(upcast(a)).unflatten(-1, (self.H, self.K)) / 16  # GLA's gate normaliser
        elif a is not None:
            dt = F.softplus(upcast(a) + self.dt_bias)
            g = -self.A_log.exp() * dt if kind.decay == "head" else None
            beta = dt if kind.beta == "dt" else None
        if kind.beta == "sigmoid":
            beta = upcast(b).sigmoid()
        return g, beta

    def _conv(self, i: int, x: Tensor, pos: Tensor) -> Tensor:
        return self.convs[i](x, pos) if self.convs is not None else x

    def _finish(self, o: Tensor, x: Tensor) -> Tensor:
        return self.out(self.norm(o.to(x.dtype), self.gate(x)))

    # --- training: packed segments, one core call -----------------------------------------------
    def _layout(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Packed (token, memory) pairs: token index, weight, cu_seqlens, per-memory token counts, aux."""
        B, T, _ = x.shape
        dev = x.device
        tok_parts, w_parts, seg_counts = [], [], []
        aux = x.new_zeros((), dtype=torch.float32)
        if self.routed:
            E = self.routed
            probs, weight, index = self._route(x)
            tok = torch.arange(B * T, device=dev).repeat_interleave(self.topk)
            mem = index.reshape(-1)
            order = torch.sort(mem * (B * T) + tok, stable=True).indices  # memory, then sequence, then time
            tok_parts.append(tok[order])
            w_parts.append(weight.reshape(-1)[order])
            seg_counts.append(torch.bincount(mem[order] * B + tok[order] // T, minlength=E * B))
            # Switch/Mixtral load balancing: E * sum_e (fraction of routed slots to e) * (mean prob of e)
            frac = torch.bincount(mem, minlength=E).float() / mem.numel()
            aux = self.aux_loss_coef * E * (frac * probs.reshape(-1, E).mean(0)).sum()
        if self.shared:
            tok_parts.append(torch.arange(B * T, device=dev))
            w_parts.append(torch.ones(B * T, device=dev, dtype=upcast(x).dtype))
            seg_counts.append(torch.full((B,), T, device=dev, dtype=torch.long))
        counts = torch.cat(seg_counts)
        cu = F.pad(counts.cumsum(0), (1, 0))
        per_memory = counts.view(self.M, B).sum(1)
        return torch.cat(tok_parts), torch.cat(w_parts), cu, per_memory, aux

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
        H, K, V = self.H, self.K, self.V
        tok, weight, cu, per_memory, aux = self._layout(x)
        _, pos = segment_positions(cu)
        xf = x.reshape(B * T, D)
        if self.routed:  # (token, memory) pairs, grouped by memory: gather (its backward is an index_add)
            xp, q_in = xf.index_select(0, tok), self.q_proj(xf).index_select(0, tok)
            edges = F.pad(per_memory.cumsum(0), (1, 0)).tolist()  # each memory's tokens are contiguous
            parts = [self._project(xp[edges[m]:edges[m + 1]], m) for m in range(self.M)]
            k_in, v_in, a, b = (torch.cat(p) if p[0] is not None else None for p in zip(*parts))
        else:  # one memory over every token in order: the pairs are the tokens themselves
            q_in, (k_in, v_in, a, b) = self.q_proj(xf), self._project(xf, 0)
        q, k, v = self._conv(0, q_in, pos), self._conv(1, k_in, pos), self._conv(2, v_in, pos)
        g, beta = self._gates(a, b)
        heads = lambda t, d: t.unflatten(-1, (H, d))[None]
        o, final = memory_op(heads(q, K), heads(k, K), heads(v, V), g=None if g is None else g[None],
                             beta=None if beta is None else beta[None], delta=self.kind.delta, cu_seqlens=cu,
                             normalize_qk=self.kind.normalize_qk, chunk_size=self.chunk_size)
        o = o[0]
        if self.kind.skip:
            o = upcast(o) + self.D_skip[:, None] * upcast(v).unflatten(-1, (H, V))
        if self.routed:  # weighted sum over each token's memories, in fp32
            out = torch.zeros(B * T, H, V, device=x.device, dtype=upcast(o).dtype)
            out.index_add_(0, tok, upcast(o) * weight[:, None, None])
        else:
            out = o
        y = self._finish(out.view(B, T, H, V), x)
        if not want_state:
            return y, aux, None
        # Segments are ordered memory-major (memory, sequence): M * B of them, some possibly empty, whose
        # final state is then the zero initial state, as for a memory that was never routed to.
        state = {"S": final.view(self.M, B, H, K, V).transpose(0, 1).contiguous()}
        if self.convs is not None:
            for i, (conv, inp) in enumerate(zip(self.convs, (q_in, k_in, v_in))):
                tail = conv.tail(inp, cu)  # (M * B, width - 1, C)
                state[f"conv{i}"] = tail.view(self.M, B, *tail.shape[1:]).transpose(0, 1).contiguous()
        return y, aux, state

    # --- decoding: one token, explicit state -----------------------------------------------------
    def init_state(self, batch: int, device, dtype=torch.float32) -> Dict[str, Tensor]:
        state = {"S": torch.zeros(batch, self.M, self.H, self.K, self.V, device=device,
                                 dtype=torch.promote_types(dtype, torch.float32))}
        if self.convs is not None:
            for i, conv in enumerate(self.convs):
                state[f"conv{i}"] = conv.init_state(batch, device, dtype)[:, None].repeat(1, self.M, 1, 1)
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
        written, all of them in one core call, and `state` is updated in place and returned: decoding is
        bound by state traffic, and copying every memory's state per token would more than double it."""
        B = x.shape[0]
        H, K, V = self.H, self.K, self.V
        sel, weight = self._select(x)
        A = sel.shape[1]
        flat = (torch.arange(B, device=x.device)[:, None] * self.M + sel).flatten()  # rows of (B * M, ...)
        read = lambda t: t.flatten(0, 1).index_select(0, flat)  # (B, M, ...) -> the selected (B * A, ...)
        write = lambda t, new: t.view(-1, *t.shape[2:]).index_copy_(0, flat, new.to(t.dtype))  # in place
        # Every memory's projections in one batched product (each weight is read once), then the selected.
        proj = lambda w: read(torch.einsum("bd,mdn->bmn", x, w.to(x.dtype))) if w is not None else None
        k, v = proj(self.w_k), proj(self.w_v)
        a, b = proj(getattr(self, "w_a", None)), proj(getattr(self, "w_b", None))
        q = self.q_proj(x).repeat_interleave(A, 0)
        if self.convs is not None:
            convolved = []
            for i, (conv, t) in enumerate(zip(self.convs, (q, k, v))):
                y, window = conv.step(t, read(state[f"conv{i}"]))
                write(state[f"conv{i}"], window)
                convolved.append(y)
            q, k, v = convolved
        g, beta = self._gates(a, b)
        o, S = memory_step(q.unflatten(-1, (H, K)), k.unflatten(-1, (H, K)), v.unflatten(-1, (H, V)),
                           read(state["S"]), g=g, beta=beta, delta=self.kind.delta,
                           normalize_qk=self.kind.normalize_qk)
        write(state["S"], S)
        o = upcast(o).view(B, A, H, V)
        if self.kind.skip:
            o = o + self.D_skip[:, None] * upcast(v).view(B, A, H, V)
        return self._finish((weight[:, :, None, None] * o).sum(1), x), state

    def state_size(self, seq_len: int) -> Dict[str, int]:
        per_memory = self.H * self.K * self.V
        active = (self.topk if self.routed else 0) + int(self.shared)
        return {"total": self.M * per_memory, "active": active * per_memory}
