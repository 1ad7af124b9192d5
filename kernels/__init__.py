"""The shared memory core of every mom_bench mixer.

`chunk` runs the chunked (parallel) form, `step` one decoding step, `short_conv` the short
convolution before the recurrence, `pack_pairs` MoM's packing of routed tokens into segments, `combine`
MoM's weighted sum of each token's memory outputs after it, `gated_rms_norm` the gated norm after that.
The first two take the switches of `reference` (decay g, beta, delta rule, q/k normalisation). Two
backends compute the same functions: the PyTorch references (`reference.py`) and the Triton kernels
(the `triton/` package: `chunk.py`, `step.py`, `conv.py`, `pairs.py`, `combine.py`, `norm.py`). Models
never pick one; the switch here does:

    MOM_BENCH_BACKEND=torch | triton | auto   (or `set_backend(...)`)

`auto` (the default) runs the Triton kernels on CUDA tensors and the references on the CPU, where Triton
has no compiler. `torch` forces the references everywhere (the baseline for checking the kernels on a
GPU); `triton` forces the kernels (on the CPU that needs TRITON_INTERPRET=1 set before the first import).
"""
import importlib
import os

from . import reference
from .reference import l2norm, segment_positions

BACKENDS = ("torch", "triton", "auto")
# The widest head (key and value dim) the Triton kernels take; models refuse wider heads when built, so a
# configuration that runs on the CPU's references also runs on a GPU.
MAX_HEAD_DIM = 512
_backend = os.environ.get("MOM_BENCH_BACKEND", "auto")


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


def _triton(x, module: str):
    """Module `module` of the Triton package when the switch asks for it for tensor x, else None (imported
    lazily: triton is needed only where it runs). Callers look their function up on it at each call."""
    if _backend == "torch" or (_backend == "auto" and not x.is_cuda):
        return None
    return importlib.import_module(f".triton.{module}", __name__)


def chunk(q, k, v, g=None, beta=None, delta=False, scale=None, initial_state=None, cu_seqlens=None,
              normalize_qk=False, chunk_size=64):
    kw = dict(g=g, beta=beta, delta=delta, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
              normalize_qk=normalize_qk, chunk_size=chunk_size)
    tc = _triton(q, "chunk")
    return tc.chunk(q, k, v, **kw) if tc else reference.chunk(q, k, v, **kw)


def short_conv(x, weight, bias, pos, split=()):
    """Causal depthwise convolution + SiLU over packed segments (see `reference.short_conv`); with split
    (channel counts), the output's column blocks as a tuple. Columns of x past the weight's channels are
    not convolved: they come back last (see `short_conv` in triton/conv.py)."""
    tc = _triton(x, "conv")
    if tc is None:
        C = weight.shape[0]
        y = reference.short_conv(x[:, :C], weight, bias, pos)
        ys = (*(y.split(list(split), -1) if split else (y,)), *((x[:, C:],) if x.shape[1] > C else ()))
        return ys if split or len(ys) > 1 else ys[0]
    return tc.short_conv(x, weight, bias, pos, split)


def gated_rms_norm(x, gate, weight, eps=1e-6):
    """RMSNorm over each head's channels, times silu(gate) (see `reference.gated_rms_norm`)."""
    tn = _triton(x, "norm")
    return tn.gated_rms_norm(x, gate, weight, eps) if tn else reference.gated_rms_norm(x, gate, weight, eps)


def combine(o, slots, weight, dtype=None):
    """out[r] = sum_a weight[r, a] * o[slots[r, a]], in fp32, rounded to dtype (see `reference.combine`)."""
    tc = _triton(o, "combine")
    return tc.combine(o, slots, weight, dtype) if tc else reference.combine(o, slots, weight, dtype)


def pack_pairs(index, num_memories, shared):
    """MoM's (token, memory) pairs packed into (memory, sequence) segments (see `reference.pack_pairs`)."""
    tp = _triton(index, "pairs")
    return tp.pack_pairs(index, num_memories, shared) if tp else reference.pack_pairs(index, num_memories, shared)


def step(q, k, v, state, g=None, beta=None, delta=False, scale=None, normalize_qk=False, index=None):
    """One decoding step (see `reference.step`); with `index`, the states are rows of a pool, updated in
    place."""
    kw = dict(g=g, beta=beta, delta=delta, scale=scale, normalize_qk=normalize_qk, index=index)
    ts = _triton(q, "step")
    return ts.step(q, k, v, state, **kw) if ts else reference.step(q, k, v, state, **kw)


__all__ = ["chunk", "step", "short_conv", "pack_pairs", "combine", "gated_rms_norm", "set_backend",
           "get_backend", "MAX_HEAD_DIM", "reference", "l2norm", "segment_positions"]
