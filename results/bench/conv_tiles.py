"""Time the short convolution (one call over q|k|v split in three, forward + backward, bf16) for every
tile of `kernels/triton_conv.CONFIG` in a small grid, at the MoM layer's two benchmark shapes: B8 x T2048
(49K pairs, 3 x 1024 channels) and MQAR size (196K pairs, 3 x 128 channels). Each tile's results are
checked against the default tile's. Used to pick CONFIG:

    python results/bench/conv_tiles.py
"""
import itertools, torch
from triton.testing import do_bench
from mom_bench.kernels import triton_conv as TC, segment_positions
torch.manual_seed(0)
for N, C, nseg in ((49152, 3072, 40), (196608, 384, 640)):
    lens = torch.full((nseg,), N // nseg); lens[-1] += N - lens.sum()
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
    TC.CONFIG.update(BN=64, BC=128, num_warps=4)
    ref = run()
    for BN, BC, nw in itertools.product((32, 64, 128), (64, 128, 256), (4, 8)):
        TC.CONFIG.update(BN=BN, BC=BC, num_warps=nw)
        got = run()
        err = max(((g.float() - r.float()).abs().max() / r.float().abs().max()).item() for g, r in zip(got, ref))
        ms = do_bench(run, rep=100)
        print(f"N{N} C{C} BN{BN} BC{BC} warps{nw}: fwd+bwd {ms:.3f} ms  max rel diff vs default {err:.1e}",
              flush=True)
