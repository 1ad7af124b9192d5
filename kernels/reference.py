"""Plain PyTorch references for every memory algorithm of mom_bench, in two forms that agree.

One recurrence covers them all. With the state S of shape (K, V) per head, read as o_t = S_t^T q_t:

    S'_t = Diag(a_t) S_{t-1}                          a_t = exp(g_t): decay (1 when g is None)
    u_t  = beta_t (v_t - S'_t^T k_t)   if delta       the delta rule writes only what is new ...
    u_t  = beta_t v_t                  otherwise       ... plain memories add every value
    S_t  = S'_t + k_t u_t^T
    o_t  = S_t^T (scale * q_t)

| algorithm | g (decay: none, head, channel) | beta | delta |
|---|---|---|---|
| linear attention | None | None | False |
| per-head decay (Mamba-2 / SSD, RetNet) | (B, T, H) | None | False |
| per-channel decay (GLA) | (B, T, H, K) | None | False |
| delta rule (DeltaNet) | None | (B, T, H) | True |
| gated delta rule (Gated DeltaNet) | (B, T, H) | (B, T, H) | True |
| per-channel gated delta rule (KDA) | (B, T, H, K) | (B, T, H) | True |

g is the log of the decay (<= 0). Tensors are (B, T, H, D) as in flash-linear-attention. With cu_seqlens
(N + 1 offsets into the time axis) B must be 1 and each of the N segments starts from its own initial
state; segments may be empty. States are (N or B, H, K, V) and always float32 (float64 for float64 inputs).

`recurrent` steps token by token (the ground truth, and `step` is what decoding calls); `chunk` is the
parallel form used for training on the CPU and as the reference for the Triton kernels.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _check(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Optional[Tensor],
           cu_seqlens: Optional[Tensor], initial_state: Optional[Tensor], cu_values: bool = True) -> None:
    """Shapes, and with cu_values the values of cu_seqlens (the Triton core checks those itself, on the
    device, in the kernel that lays out its chunks)."""
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be (B, T, H, V) = ({B}, {T}, {H}, V), got {tuple(v.shape)}")
    if g is not None and g.shape not in ((B, T, H), (B, T, H, K)):
        raise ValueError(f"g must be (B, T, H) or (B, T, H, K), got {tuple(g.shape)}")
    if beta is not None and beta.shape != (B, T, H):
        raise ValueError(f"beta must be (B, T, H), got {tuple(beta.shape)}")
    N = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1, got {B}")
        if cu_values:
            ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == T) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
            if cu_seqlens.is_cuda:  # checked on the device: a host check would stall the stream
                torch._assert_async(ok, f"cu_seqlens must rise from 0 to T={T}")
            elif not ok:
                raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {cu_seqlens.tolist()}")
        N = len(cu_seqlens) - 1
    if initial_state is not None and initial_state.shape != (N, H, K, v.shape[-1]):
        raise ValueError(f"initial_state must be ({N}, {H}, {K}, {v.shape[-1]}), got {tuple(initial_state.shape)}")


def step(q: Tensor, k: Tensor, v: Tensor, state: Tensor, g: Optional[Tensor] = None,
         beta: Optional[Tensor] = None, delta: bool = False, scale: Optional[float] = None,
         normalize_qk: bool = False, index: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One token for a batch: q, k (B, H, K), v (B, H, V), g (B, H) or (B, H, K), beta (B, H),
    state (B, H, K, V). Returns (o (B, H, V) in q's dtype, new state).

    With index (B,) of distinct rows, state is a pool (N, H, K, V) whose row index[b] is sequence b's
    state: the new states are written into those rows in place, and the pool is returned."""
    if index is not None:
        o, new = step(q, k, v, state.index_select(0, index), g, beta, delta, scale, normalize_qk)
        return o, state.index_copy_(0, index, new.to(state.dtype))
    dt = state.dtype
    out_dtype = q.dtype
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if normalize_qk:
        q, k = l2norm(q), l2norm(k)
    q = q * (q.shape[-1] ** -0.5 if scale is None else scale)
    if g is not None:
        decay = g.to(dt).exp()
        state = state * (decay[..., None, None] if decay.dim() == 2 else decay[..., None])
    u = v - torch.einsum("bhk,bhkv->bhv", k, state) if delta else v
    if beta is not None:
        u = u * beta.to(dt)[..., None]
    state = state + k[..., :, None] * u[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q, state)
    return o.to(out_dtype), state


def recurrent(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None, beta: Optional[Tensor] = None,
              delta: bool = False, scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
              cu_seqlens: Optional[Tensor] = None, normalize_qk: bool = False) -> Tuple[Tensor, Tensor]:
    """Token-by-token reference. Returns (o (B, T, H, V), final state (N, H, K, V))."""
    _check(q, k, v, g, beta, cu_seqlens, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    bounds = [(b, 0, T) for b in range(B)] if cu_seqlens is None else [
        (0, int(s), int(e)) for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    dt = _compute_dtype(q)
    o = torch.zeros(B, T, H, V, dtype=q.dtype, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(bounds):
        S = (torch.zeros(H, K, V, dtype=dt, device=q.device) if initial_state is None
             else initial_state[n].to(dt))[None]
        for t in range(start, end):
            o_t, S = step(q[b:b + 1, t], k[b:b + 1, t], v[b:b + 1, t], S,
                          None if g is None else g[b:b + 1, t], None if beta is None else beta[b:b + 1, t],
                          delta, scale, normalize_qk)
            o[b, t] = o_t[0]
        finals.append(S[0])
    return o, torch.stack(finals)


def segment_positions(cu_seqlens: Tensor, total: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """For packed segments: the segment of every token and its position inside that segment. Pass the
    token count `total` (= cu_seqlens[-1]) when the caller knows it: the device then needs no host sync."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    total = int(cu_seqlens[-1]) if total is None else total
    seg = torch.repeat_interleave(torch.arange(len(lens), device=cu_seqlens.device), lens, output_size=total)
    pos = torch.arange(total, device=cu_seqlens.device) - cu_seqlens[seg]
    return seg, pos


def pack_pairs(index: Tensor, num_memories: int, shared: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """MoM's (token, memory) pairs, packed into segments: one per (memory, sequence), memory-major, in time
    order inside (a stable sort, so time order is guaranteed); with `shared`, one more memory's segments
    after them, holding every token. index (B, T, k): each token's k distinct routed memories, in
    [0, num_memories). Returns, with M = num_memories + shared and P = B*T*k (+ B*T):
    tok (P,) the flat token (b*T + t) of each pair; slots (B*T, k + shared) each token's pairs, its k
    routed ones in index order then the shared one; cu (M*B + 1,) int32 the segments' offsets; pos (P,)
    each pair's position inside its segment. No host sync."""
    B, T, k = index.shape
    BT, E, dev = B * T, num_memories, index.device
    pair_tok = torch.arange(BT, device=dev).repeat_interleave(k)
    mem = index.reshape(-1)
    order = torch.sort(mem * BT + pair_tok, stable=True).indices  # memory, then sequence, then time
    slots = torch.empty_like(order)
    slots[order] = torch.arange(len(order), device=dev)  # packed index of each (token, k) slot
    counts = pair_tok.new_zeros(E * B).index_add_(0, mem * B + pair_tok // T, torch.ones_like(mem))
    tok, slots = pair_tok[order], slots.view(BT, k)
    if shared:  # its pairs are the tokens in order, after the routed ones
        every = torch.arange(BT, device=dev)
        tok, slots = torch.cat([tok, every]), torch.cat([slots, every[:, None] + BT * k], 1)
        counts = torch.cat([counts, counts.new_full((B,), T)])
    cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    return tok, slots, cu, segment_positions(cu, len(tok))[1]


def _to_padded(x: Optional[Tensor], seg: Tensor, pos: Tensor, n: int, width: int) -> Optional[Tensor]:
    """(1, T, ...) packed segments -> (n, width, ...), zero-padded at the end of each segment."""
    if x is None:
        return None
    out = x.new_zeros((n, width) + tuple(x.shape[2:]))
    out[seg, pos] = x[0]
    return out


def chunk(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None, beta: Optional[Tensor] = None,
            delta: bool = False, scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
            cu_seqlens: Optional[Tensor] = None, normalize_qk: bool = False,
            chunk_size: int = 64) -> Tuple[Tensor, Tensor]:
    """Chunk-parallel reference. Same arguments and results as `recurrent`.

    Variable-length segments are padded to the longest one: a padded token has k = v = 0, beta = 0 and
    g = 0, so it leaves the state exactly as it was and the final state is the segment's own.
    """
    _check(q, k, v, g, beta, cu_seqlens, initial_state)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(q.device, torch.long)
        n = len(cu) - 1
        width = max(int((cu[1:] - cu[:-1]).max()) if n else 0, 1)
        seg, pos = segment_positions(cu)
        if delta and beta is None:  # padding must carry beta = 0, so spell out the implicit 1
            beta = torch.ones_like(q[..., 0])
        o_p, final = chunk(*(_to_padded(x, seg, pos, n, width) for x in (q, k, v, g)),
                             beta=_to_padded(beta, seg, pos, n, width), delta=delta, scale=scale,
                             initial_state=initial_state, normalize_qk=normalize_qk, chunk_size=chunk_size)
        return o_p[seg, pos][None], final

    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = _compute_dtype(q)
    out_dtype = v.dtype
    # (B, H, T, D) layout and the compute dtype for everything below.
    q, k, v = (x.to(dt).transpose(1, 2) for x in (q, k, v))
    if normalize_qk:
        q, k = l2norm(q), l2norm(k)
    q = q * (K ** -0.5 if scale is None else scale)
    per_channel = g is not None and g.dim() == 4
    if g is None:
        g = q.new_zeros(B, H, T, 1)
    else:
        g = g.to(dt).transpose(1, 2)
        g = g if per_channel else g[..., None]
    if beta is not None:
        beta = beta.to(dt).transpose(1, 2)  # (B, H, T)
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt).clone()
    o = q.new_empty(B, H, T, V)
    # The per-channel pairwise decay tensor is (n, n, K) per chunk: smaller chunks keep it cheap.
    C = min(chunk_size, 16) if per_channel else chunk_size
    for start in range(0, T, C):
        sl = slice(start, min(start + C, T))
        qc, kc, vc = q[:, :, sl], k[:, :, sl], v[:, :, sl]
        G = g[:, :, sl].cumsum(2)  # log decay from the chunk start up to and including each token
        n = qc.shape[2]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        # Decay from token s to token t (s <= t): exp(G_t - G_s); masked before exp so it never overflows.
        diff = (G[:, :, :, None, :] - G[:, :, None, :, :]).masked_fill(~causal[:, :, None], float("-inf"))
        decay = diff.exp()  # (B, H, n, n, K or 1)
        if per_channel:  # sum_k a_k b_k exp(G_tk - G_sk): no matrix product factors it safely
            pair = lambda a: (a[:, :, :, None, :] * kc[:, :, None, :, :] * decay).sum(-1)
        else:
            pair = lambda a: (a @ kc.transpose(-1, -2)) * decay[..., 0]
        A_qk = pair(qc)
        G_all = G.exp()  # decay from the chunk start
        if delta:
            b = beta[:, :, sl, None] if beta is not None else torch.ones_like(vc[..., :1])
            # u = b * (v - S^T (G_all*k) - sum_{s<t} A_kk[t,s] u_s)  =>  (I + b*strict(A_kk)) u = rhs
            lhs = torch.eye(n, dtype=dt, device=q.device) + b * pair(kc).tril(-1)
            rhs = b * (vc - (kc * G_all) @ S)
            u = torch.linalg.solve_triangular(lhs, rhs, upper=False, unitriangular=True)
        else:
            u = vc * beta[:, :, sl, None] if beta is not None else vc
        o[:, :, sl] = (qc * G_all) @ S + A_qk @ u
        G_last = G[:, :, -1:]
        S = G_last.exp().transpose(-1, -2) * S + (kc * (G_last - G).exp()).transpose(-1, -2) @ u
    return o.transpose(1, 2).to(out_dtype), S


def short_conv(x: Tensor, weight: Tensor, bias: Tensor, pos: Tensor) -> Tensor:
    """Causal depthwise convolution then SiLU over packed segments: x (N, C), weight (C, W) with
    weight[:, W-1] on the current token, bias (C,), pos (N,) each token's position in its segment."""
    width = weight.shape[1]
    out = x * weight[:, -1] + bias
    for j in range(1, width):
        shifted = F.pad(x, (0, 0, j, 0))[: x.shape[0]]  # x[t - j], zero where the tap leaves its segment
        out = out + shifted * (pos >= j)[:, None].to(x.dtype) * weight[:, -1 - j]
    return F.silu(out)


def gated_rms_norm(x: Tensor, gate: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """The memory mixers' output norm: RMSNorm over each head's V channels, times silu of the gate.
    x (..., H, V), gate (..., H * V), weight (V,) -> (..., H * V)."""
    xf = x.float()
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return n.flatten(-2) * F.silu(gate)


def combine(o: Tensor, slots: Tensor, weight: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """MoM's weighted sum of each token's memory outputs: out[r] = sum_a weight[r, a] * o[slots[r, a]],
    summed in fp32 (at least) and rounded to `dtype` (default o's). o (P, C), slots (R, A) listing every row
    of o exactly once, weight (R, A) -> (R, C)."""
    out = (o[slots] * weight[..., None].to(torch.promote_types(weight.dtype, torch.float32))).sum(1)
    return out.to(dtype or o.dtype)
