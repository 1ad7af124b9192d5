"""Where the CPU's time goes when the MoM layer's fwd+bwd is enqueued (cProfile, by own time), at MQAR
size by default, where the layer is bound by the CPU rather than the GPU. Also times the enqueue of one
fwd+bwd with and without the profiler, and a plain linear layer's fwd+bwd at the same shape for scale:

    python -m mom_bench.bench.tools.cpu_profile [mqar|big|long]
"""
import cProfile
import pstats
import sys

import torch

from .profile_layers import build, enqueue_ms


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "mqar"
    m, x, gy = build(name)
    D = x.shape[-1]
    lin = torch.nn.Linear(D, D, bias=False).cuda().bfloat16()

    def fwd_bwd():
        for p in m.parameters():
            p.grad = None
        m(x)[0].backward(gy)

    def linear():
        lin(x).backward(gy)

    for label, fn in (("MoM layer", fwd_bwd), ("one linear layer", linear)):
        cpu, wall = enqueue_ms(fn)
        print(f"{name} {label}: CPU enqueue {cpu:.2f} ms per fwd+bwd, wall {wall:.2f} ms", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        fwd_bwd()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(35)


if __name__ == "__main__":
    main()
