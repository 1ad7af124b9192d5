"""The shared memory core of every mom_bench mixer.

`memory_op` runs the chunked (parallel) form, `memory_step` one decoding step. Both take the switches of
`reference` (decay g, beta, delta rule, q/k normalisation). The PyTorch references are the CPU backend;
the Triton kernels plug in here for CUDA tensors, so models never choose a backend themselves.
"""
from . import reference
from .reference import l2norm, segment_positions


def memory_op(q, k, v, g=None, beta=None, delta=False, scale=None, initial_state=None, cu_seqlens=None,
              normalize_qk=False, chunk_size=64):
    return reference.chunked(q, k, v, g=g, beta=beta, delta=delta, scale=scale, initial_state=initial_state,
                             cu_seqlens=cu_seqlens, normalize_qk=normalize_qk, chunk_size=chunk_size)


def memory_step(q, k, v, state, g=None, beta=None, delta=False, scale=None, normalize_qk=False):
    return reference.step(q, k, v, state, g=g, beta=beta, delta=delta, scale=scale, normalize_qk=normalize_qk)


__all__ = ["memory_op", "memory_step", "reference", "l2norm", "segment_positions"]
