"""Time the MoM layer's fwd+bwd (bf16, do_bench) under variants of the core's launch configuration
(`kernels/triton_chunk.CONFIG_OVERRIDES`: warps per kernel, V block of the sequential kernels), at the
three benchmark shapes of `profile_layers.py`. Each variant's output and gradients are checked against
the default's. Used to pick the defaults of `_config`:

    python results/bench/core_configs.py [mqar] [big] [long]
"""
import sys

from triton.testing import do_bench

from mom_bench.kernels import triton_chunk as TC

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from profile_layers import build  # noqa: E402

VARIANTS = {  # the ones timed before 4 warps became the default for prep and dq/dk: see the README
    "default": {},
    "prep 8, dqk 8": dict(warps_prep=8, warps_dqk=8),
    "warps (o, dv) 8": dict(warps=8),
}

for name in sys.argv[1:] or ["mqar", "big", "long"]:
    m, x, gy = build(name)

    def fwd_bwd():
        for p in m.parameters():
            p.grad = None
        x.grad = None
        y = m(x)[0]
        y.backward(gy)
        return y

    def results():
        return [fwd_bwd().float(), x.grad.float()] + [p.grad.float() for p in m.parameters()]

    ref = None
    for label, over in VARIANTS.items():
        TC.CONFIG_OVERRIDES.clear()
        TC.CONFIG_OVERRIDES.update(over)
        got = results()
        ref = ref or got
        err = max(((g - r).norm() / r.norm().clamp_min(1e-12)).item() for g, r in zip(got, ref))
        ms = do_bench(fwd_bwd, rep=200)
        print(f"{name}: {label:>20}: fwd+bwd {ms:6.2f} ms  (rel. diff from default {err:.1e})", flush=True)
    TC.CONFIG_OVERRIDES.clear()
