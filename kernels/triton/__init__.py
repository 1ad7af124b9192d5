"""The Triton backend of `mom_bench.kernels` (whose switch picks it or the PyTorch references), a module
per stage:

    env.py        `interpreting()`: whether Triton runs in its CPU interpreter, and the interpreter's fix
    jit.py        the small @triton.jit helpers that the chunked core's kernels share, and their constants
    chunk_fwd.py  the chunked core's forward kernels: prep, the sequential pass (h), the output (o)
    chunk_bwd.py  its backward kernels: the reverse pass (dh, dvn_intra), dv, dq/dk
    chunk.py      its host side and `chunk` (the algorithm is described there)
    step.py       the decoding step, `step`
    conv.py       the short convolution, `short_conv`
    pairs.py      MoM's packing of routed tokens into segments, `pack_pairs`
    combine.py    MoM's weighted sum of each token's memory outputs, `combine`
    norm.py       the gated RMSNorm after it, `gated_rms_norm`

TUNING.md lists every tuned constant with its value and the measurement behind it. Nothing is imported
here: callers import the module they run (triton is needed only where the kernels run), and `chunk` and
`step` stay the names of modules.
"""
