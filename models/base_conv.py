"""BaseConv (Zoology, arXiv 2312.04927): a gated convolution, y = conv(u) * (u W + b) + u.

As Zoology's `BaseConv` (zoology/mixers/base_conv.py, without its optional SiLU): the input u goes through
a causal depthwise convolution and, apart, through a linear projection with bias; their elementwise
product plus u itself is the output (the mixer carries its own skip, inside the block's residual). No
output projection. The convolution is one of two:

- short (`kernel_size` taps, Zoology's `ShortConvolution`: a depthwise Conv1d with bias, no activation);
  the Based figure-2 hybrids put one of width 3 before every other mixer;
- long (`long_conv=True`, Zoology's `ImplicitLongConvolution`): a filter as long as the sequence, tap j of
  channel c given by a small MLP (3 -> 16 -> ReLU -> d_model) of position features of j on a grid of
  `l_max` positions (j / (l_max - 1), and the cosine and minus sine of 2 pi 1e-4 j / l_max), applied by FFT,
  plus u (the long convolution itself adds its input). Zoology's BaseConv models alternate short (3) and
  long layers (kernel_size [3, -1, 3, -1] in its figure-2 configs): `pattern: [base_conv, base_conv_long]`.

Decoding: the short form keeps the last (kernel_size - 1) inputs; the long form every past input (its
filter reaches back to the first token), so its state grows like a KV cache and `l_max` bounds the length.
`state_size` follows Zoology: d_model * kernel_size for the short form, d_model * seq_len for the long.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import upcast

Tensor = torch.Tensor


class BaseConv(nn.Module):
    def __init__(self, d_model: int, kernel_size: int = 3, long_conv: bool = False, l_max: int = 1024,
                 filter_hidden: int = 16, **_):
        super().__init__()
        if not long_conv and kernel_size < 1:
            raise ValueError(f"kernel_size must be at least 1, got {kernel_size}")
        if long_conv and l_max < 1:
            raise ValueError(f"l_max must be at least 1, got {l_max}")
        self.d_model, self.long_conv, self.l_max = d_model, long_conv, l_max
        self.kernel_size = l_max if long_conv else kernel_size
        self.projection = nn.Linear(d_model, d_model)
        if long_conv:  # the implicit filter: an MLP of each tap's position features
            self.filter_mlp = nn.Sequential(nn.Linear(3, filter_hidden), nn.ReLU(), nn.Linear(filter_hidden, d_model))
        else:
            self.conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, padding=kernel_size - 1)

    # --- the long convolution's filter --------------------------------------------------------------
    def filter(self, length: int, dtype) -> Tensor:
        """Taps 0 .. length - 1 of the implicit filter, (length, d_model). A tap depends on its index and
        l_max only, never on the sequence's length, so every prefix sees the same taps (causal decoding).
        The features are computed here, not kept in a buffer, so a model built on the meta device and
        loaded from a checkpoint has them too."""
        if length > self.l_max:
            raise ValueError(f"base_conv_long's filter spans l_max={self.l_max} positions (model.long_conv_len), "
                             f"got a sequence of {length}")
        dev = self.filter_mlp[0].weight.device
        t = torch.linspace(0, 1, self.l_max, device=dev, dtype=torch.float64)[:length]
        angle = 2 * math.pi * 1e-4 * torch.arange(length, device=dev, dtype=torch.float64) / self.l_max
        z = torch.stack([t, angle.cos(), -angle.sin()], -1).to(dtype)
        return self.filter_mlp(z)

    def _long(self, u: Tensor) -> Tensor:
        """Causal convolution of u (B, T, D) with the implicit filter, by FFT of size 2T (no wrap-around),
        in at least fp32 (FFTs do not take 16-bit inputs everywhere), plus u."""
        T = u.shape[1]
        uf = upcast(u)
        k = self.filter(T, uf.dtype)  # (T, D)
        spec = torch.fft.rfft(uf.transpose(1, 2), n=2 * T) * torch.fft.rfft(k.T.to(uf.dtype), n=2 * T)
        y = torch.fft.irfft(spec, n=2 * T)[..., :T].transpose(1, 2)
        return (y + uf).to(u.dtype)

    # --- the mixer contract ------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tuple[Tensor, None]:
        return self._gate(self._conv(x), x), None

    def _conv(self, x: Tensor) -> Tensor:
        if self.long_conv:
            return self._long(x)
        return self.conv(x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2)  # padding k - 1, cut: causal

    def _gate(self, conv: Tensor, x: Tensor) -> Tensor:
        return conv * self.projection(x) + x

    def prefill(self, x: Tensor) -> Tuple[Tensor, Dict[str, object]]:
        """The parallel form over a prompt, plus the inputs `step` needs: the last kernel_size - 1 (zeros
        before the first token) for the short form, all of them for the long."""
        y = self.forward(x)[0]
        if self.long_conv:
            return y, {"u": x.clone(), "len": x.shape[1]}
        padded = F.pad(x, (0, 0, self.kernel_size - 1, 0))
        return y, {"conv": padded[:, padded.shape[1] - (self.kernel_size - 1):].clone()}

    def init_state(self, batch: int, device, dtype) -> Dict[str, object]:
        if self.long_conv:
            return {"u": torch.zeros(batch, 0, self.d_model, device=device, dtype=dtype), "len": 0}
        return {"conv": torch.zeros(batch, self.kernel_size - 1, self.d_model, device=device, dtype=dtype)}

    def step(self, x: Tensor, state: Dict[str, object]) -> Tuple[Tensor, Dict[str, object]]:
        """One token (B, D). Returns a new state dict: the short form's window is new each step; the long
        form's history grows into a buffer with room to spare (as attention's KV cache), never read past
        `len`, so the state passed in stays valid."""
        if self.long_conv:
            n, buf = state["len"], state["u"]
            if n == buf.shape[1]:  # full: double the room
                buf = torch.cat([buf[:, :n], buf.new_zeros(buf.shape[0], max(n, 64), buf.shape[2])], 1)
            buf[:, n] = x
            taps = self.filter(n + 1, upcast(x).dtype).flip(0)  # taps[s] multiplies u_s: tap n - s
            conv = torch.einsum("bsd,sd->bd", upcast(buf[:, :n + 1]), taps) + upcast(x)
            return self._gate(conv.to(x.dtype), x), {"u": buf, "len": n + 1}
        window = torch.cat([state["conv"], x[:, None]], 1)  # (B, kernel_size, D), oldest first
        conv = torch.einsum("bwd,dw->bd", window, self.conv.weight[:, 0].to(x.dtype)) + self.conv.bias.to(x.dtype)
        return self._gate(conv, x), {"conv": window[:, 1:]}

    def state_size(self, seq_len: int) -> Dict[str, int]:
        # Zoology's convention: the short convolution counts its kernel_size taps of d_model channels, the
        # long one a past input of every channel for every position.
        n = self.d_model * (seq_len if self.long_conv else self.kernel_size)
        return {"total": n, "active": n}
