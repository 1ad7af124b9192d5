"""Building blocks shared by the mixers: norms, the short convolution, the MLP, rotary embeddings."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import gated_rms_norm, short_conv

Tensor = torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


NORMS = ("rms", "layer")


def block_norm(kind: str, dim: int) -> nn.Module:
    """The blocks' and the final norm: `rms` (this project's RMSNorm) or `layer` (nn.LayerNorm with its bias
    and eps 1e-5, as Zoology's blocks and final norm have)."""
    if kind == "rms":
        return RMSNorm(dim)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=1e-5)
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {kind!r}")


class GatedHeadNorm(nn.Module):
    """RMSNorm over each head's output, gated by silu(gate): the output stage of the linear mixers."""

    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, o: Tensor, gate: Tensor) -> Tensor:
        """o: (..., H, V); gate: (..., H * V). Returns (..., H * V)."""
        return gated_rms_norm(o, gate, self.weight, self.eps)


class ShortConv(nn.Module):
    """Causal depthwise convolution followed by SiLU, over packed segments.

    Tokens come packed as (N, C) with their position inside their segment; a tap that would reach back
    past the start of the segment reads zero. The decoding step keeps the last (width - 1) inputs of its
    segment and starts from zeros, so both forms compute the same function.
    """

    def __init__(self, channels: int, width: int = 4):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.randn(channels, width) / width ** 0.5)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, pos: Tensor, split: Sequence[int] = ()):
        """(N, C) -> (N, C), or with split (channel counts) its column blocks as separate arrays. Columns of x
        past C are not convolved: they come back last, as one array (see `kernels.short_conv`)."""
        return short_conv(x, self.weight, self.bias, pos, split)

    def tail(self, x: Tensor, cu_seqlens: Tensor) -> Tensor:
        """The decoding state after packed segments: each segment's last (width - 1) inputs, oldest first,
        zero where the segment is shorter (as `init_state` starts). x: (N, C) -> (segments, width - 1, C)."""
        starts, ends = cu_seqlens[:-1], cu_seqlens[1:]
        index = ends[:, None] - (self.width - 1) + torch.arange(self.width - 1, device=x.device)
        valid = (index >= starts[:, None])[..., None].to(x.dtype)
        return x[index.clamp(min=0)] * valid if len(x) else x.new_zeros(len(starts), self.width - 1, x.shape[1])

    def init_state(self, batch: int, device, dtype) -> Tensor:
        return torch.zeros(batch, self.width - 1, self.weight.shape[0], device=device, dtype=dtype)

    def step(self, x: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        """x: (B, C); state: (B, width - 1, C), oldest first."""
        window = torch.cat([state, x[:, None]], 1)
        out = torch.einsum("bwc,cw->bc", window, self.weight) + self.bias
        return F.silu(out), window[:, 1:]


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(2 * ratio * d_model / 3 + 7) // 8 * 8  # the usual 2/3 rule, rounded for the hardware
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, -1)
        return self.down(F.silu(gate) * up)


def rotary(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding on (..., T, D) with positions (T,)."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * freqs
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x.dtype)


def inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


def upcast(x: Tensor) -> Tensor:
    """At least float32: gates and mixing weights are computed in full precision under autocast."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
