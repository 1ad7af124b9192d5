"""Time the short convolution (one call over q|k|v split in three, forward + backward, bf16) with each of
its three kernels' tiles (`kernels/triton/conv.CONFIG`: fwd, dpre, dx) varied in turn over a small grid,
the other two kept at their defaults, at the MoM layer's two benchmark shapes: B8 x T2048 (49K pairs,
3 x 1024 channels) and MQAR size (196K pairs, 3 x 128 channels). Each tile's results are checked against
the defaults'. Used to pick CONFIG:

    python -m mom_bench.bench.tools.conv_tiles
"""
import copy
import itertools

import torch
from triton.testing import do_bench

from mom_bench.kernels import segment_positions
from mom_bench.kernels.triton import conv as TC


def main():
    torch.manual_seed(0)
    DEFAULT = copy.deepcopy(TC.CONFIG)
    for N, C, nseg in ((49152, 3072, 40), (196608, 384, 640)):
        lens = torch.full((nseg,), N // nseg)
        lens[-1] += N - lens.sum()
        cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).cuda()
        _, pos = segment_positions(cu, N)
        x = torch.randn(N, C + 8, device="cuda", dtype=torch.bfloat16)[:, :C]
        w = torch.randn(C, 4, device="cuda") / 2
        b = torch.randn(C, device="cuda")
        split = (C // 3, C // 3, C // 3)
        dys = [torch.randn(N, c, device="cuda", dtype=torch.bfloat16) for c in split]

        def run():
            xx, ww, bb = x.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()
            ys = TC.short_conv(xx, ww, bb, pos, split)
            torch.autograd.backward(ys, dys)
            return [torch.cat(ys, 1), xx.grad, ww.grad, bb.grad]

        ref = run()
        print(f"N{N} C{C} defaults {DEFAULT}: fwd+bwd {do_bench(run, rep=100):.3f} ms", flush=True)
        for kernel in DEFAULT:
            for BN, BC, nw in itertools.product((16, 32, 64), (64, 128), (1, 2, 4)):
                TC.CONFIG.update(copy.deepcopy(DEFAULT))
                TC.CONFIG[kernel] = dict(BN=BN, BC=BC, num_warps=nw)
                got = run()
                err = max(((g.float() - r.float()).abs().max() / r.float().abs().max()).item()
                          for g, r in zip(got, ref))
                ms = do_bench(run, rep=100)
                print(f"N{N} C{C} {kernel:4} BN{BN:3} BC{BC:4} warps{nw}: fwd+bwd {ms:.3f} ms  "
                      f"max rel diff vs defaults {err:.1e}", flush=True)
        TC.CONFIG.update(copy.deepcopy(DEFAULT))


if __name__ == "__main__":
    main()
