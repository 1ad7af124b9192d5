"""Time the MoM layer's fwd+bwd (bf16, do_bench) under variants of the core's launch configuration
(`kernels/triton/chunk.CONFIG_OVERRIDES`: warps and pipeline stages per kernel, V block of the sequential
kernels) and of its module constants (upper-case keys: WORKSPACE_BYTES, KEEP_BYTES), at the three
benchmark shapes of `profile_layers.py`. Each variant's output and gradients are checked against the
default's; the peak memory of one fwd+bwd above its inputs is printed beside the time. Used to pick the
defaults of `_config`:

    python -m mom_bench.bench.tools.core_configs [mqar] [big] [long]
"""
import sys

from triton.testing import do_bench

from mom_bench.bench import peak_mb
from mom_bench.kernels.triton import chunk as TC

from .profile_layers import build

MB = 2 ** 20
VARIANTS = {  # the latest set timed: see results/bench/core_configs.md for the earlier ones
    "768 MB (default)": {},
    "512 MB": dict(WORKSPACE_BYTES=512 * MB),
    "300 MB": dict(WORKSPACE_BYTES=300 * MB),
    "768 MB, keep nothing": dict(KEEP_BYTES=0),
}
DEFAULTS = {n: getattr(TC, n) for n in ("WORKSPACE_BYTES", "KEEP_BYTES")}


def apply(over):
    TC.CONFIG_OVERRIDES.clear()
    TC.CONFIG_OVERRIDES.update({k: v for k, v in over.items() if not k.isupper()})
    for n, v in DEFAULTS.items():
        setattr(TC, n, over.get(n, v))


def main():
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
            apply(over)
            try:
                got = results()
            except Exception as e:  # a variant that does not compile or run is reported, not fatal
                print(f"{name}: {label:>24}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            ref = ref or got
            err = max(((g - r).norm() / r.norm().clamp_min(1e-12)).item() for g, r in zip(got, ref))
            ms = do_bench(fwd_bwd, rep=200)
            peak = peak_mb(fwd_bwd)
            print(f"{name}: {label:>24}: fwd+bwd {ms:6.2f} ms  peak {peak:6.0f} MB  "
                  f"(rel. diff from default {err:.1e})", flush=True)
        apply({})


if __name__ == "__main__":
    main()
