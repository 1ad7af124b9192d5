"""Profile our layers' fwd+bwd on a GPU (bf16): do_bench time, CPU time to enqueue one call, host syncs per
call, peak memory above the inputs, then torch.profiler tables by CPU and by CUDA time (3 calls summed).

    python -m mom_bench.bench.tools.profile_layers [mqar] [big] [long] [gdn]

mqar: MoM at MQAR size (hidden 128, 2x64 heads, B128 x T512); big: MoM, hidden 1024, 4x256 heads,
B8 x T2048; long: the same at B1 x T16384; gdn: our plain Gated DeltaNet layer at the big shape. Used for
the breakdown in results/bench/README.md."""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from mom_bench.bench import peak_mb
from mom_bench.models import MemoryMixer

CASES = {  # name: (B, T, hidden, heads, head dim, routed memories)
    "mqar": (128, 512, 128, 2, 64, 4),
    "big": (8, 2048, 1024, 4, 256, 4),
    "long": (1, 16384, 1024, 4, 256, 4),
    "gdn": (8, 2048, 1024, 4, 256, 0),
}


def build(name):
    """A case's layer (bf16, on the GPU, seeded), its input and an output gradient; also used by
    core_configs.py and cpu_profile.py."""
    B, T, D, H, hd, memories = CASES[name]
    torch.manual_seed(0)
    m = MemoryMixer(D, H, hd, kind="gated_delta", num_memories=memories, topk=2, shared_memory=True)
    m = m.cuda().bfloat16()
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
    return m, x, gy


def enqueue_ms(fn, n=20):
    """(CPU ms to enqueue one call of fn, wall ms per call) over n calls after one warm-up; also used by
    cpu_profile.py and ab_layer.py."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return 1e3 * (t1 - t0) / n, 1e3 * (t2 - t0) / n


def profile_case(name, B, T, D, H, hd, memories):
    m, x, gy = build(name)

    def fwd_bwd():
        for p in m.parameters():
            p.grad = None
        m(x)[0].backward(gy)

    fwd_bwd()
    torch.cuda.synchronize()
    ms = do_bench(fwd_bwd, rep=300)
    t0 = time.perf_counter()
    fwd_bwd()  # the CPU's share: time until the call returns, before the GPU has finished
    enqueue = 1e3 * (time.perf_counter() - t0)
    peak = peak_mb(fwd_bwd)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fwd_bwd()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    gpu = [e for e in ka if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.self_device_time_total for e in gpu) / 3 / 1000
    launches = sum(e.count for e in gpu) / 3
    print(f"### {name} B{B} x T{T}, hidden {D}, {H}x{hd}, memories {memories}: fwd+bwd {ms:.2f} ms | CPU enqueue "
          f"{enqueue:.2f} ms | GPU kernels {gpu_ms:.2f} ms, {launches:.0f} per call | peak above inputs {peak:.0f} MB",
          flush=True)
    print(ka.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=50), flush=True)
    print(ka.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=70), flush=True)


def main():
    for name in sys.argv[1:] or list(CASES):
        profile_case(name, *CASES[name])


if __name__ == "__main__":
    main()
