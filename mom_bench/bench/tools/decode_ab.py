"""The bench's decode case (B8, 4x256 heads, 3 of 5 memories per sequence, bf16 inputs, fp32 states) both
ways in one process, alternating: the selected states gathered, stepped and scattered back (MoM's step
before e171260), and stepped in place in the pool (one launch). Checks that both give the same output and
states, then per way: do_bench, the CPU's time to enqueue one call, and the call replayed as a CUDA graph.

    python -m mom_bench.bench.tools.decode_ab
"""
import time

import torch
from triton.testing import do_bench

from mom_bench.kernels import step


def main():
    B, H, K, M, A = 8, 4, 256, 5, 3
    dt = torch.bfloat16
    S = torch.randn(B, M, H, K, K, device="cuda") * 0.01
    idx = torch.stack([torch.randperm(M - 1, device="cuda")[:2] for _ in range(B)])
    idx = torch.cat([idx, torch.full((B, 1), M - 1, device="cuda")], 1)
    flat = (torch.arange(B, device="cuda")[:, None] * M + idx).flatten()
    q, k, v = (torch.randn(B * A, H, K, device="cuda", dtype=dt) for _ in range(3))
    g = -torch.rand(B * A, H, device="cuda")
    beta = torch.rand(B * A, H, device="cuda", dtype=dt)
    pool = S.view(B * M, H, K, K)

    def old():
        o, s = step(q, k, v, pool.index_select(0, flat), g=g, beta=beta, delta=True, normalize_qk=True)
        pool.index_copy_(0, flat, s)
        return o

    def new():
        return step(q, k, v, pool, g=g, beta=beta, delta=True, normalize_qk=True, index=flat)[0]

    S0 = S.clone()
    o1 = old(); s1 = S.clone(); S.copy_(S0)
    o2 = new(); s2 = S.clone(); S.copy_(S0)
    print(f"max diff o {(o1.float() - o2.float()).abs().max().item():.2e} state {(s1 - s2).abs().max().item():.2e}")
    for rnd in range(3):
        for name, fn in (("old", old), ("new", new)):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(200):
                fn()
            cpu = (time.perf_counter() - t) / 200 * 1e3
            torch.cuda.synchronize()
            g_ = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g_):
                fn()
            print(f"round {rnd} {name}: do_bench {do_bench(fn, rep=200):.4f} ms, CPU enqueue {cpu:.4f} ms, "
                  f"graph replay {do_bench(g_.replay, rep=200):.4f} ms", flush=True)


if __name__ == "__main__":
    main()
