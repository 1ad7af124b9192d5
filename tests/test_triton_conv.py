"""The short-convolution kernels against `reference.short_conv`: output and the gradients of x, the
taps and the bias, over packed segments of every awkward length (0, 1, shorter than the window, spanning
row blocks). On the CPU the kernels run in Triton's interpreter, in fp32."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from mom_bench.kernels import reference, segment_positions  # noqa: E402
from mom_bench.kernels.triton.conv import short_conv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(fn, x, w, b, pos, dy, pad=0):
    """fn's output and gradients; with pad, x is read as a column block of a wider array (rows further
    apart than C), as the MoM layer passes its projections."""
    if pad:
        x = torch.cat([torch.randn(len(x), pad, dtype=x.dtype, device=x.device), x, x[:, :pad]], 1)
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    C = w.shape[0]
    y = fn(x[:, pad:pad + C] if pad else x, w, b, pos)
    y.backward(dy)
    if pad:
        others = torch.cat([x.grad[:, :pad], x.grad[:, pad + C:]], 1)
        assert not others.any(), "the gradient must reach only the block that was read"
    return y, x.grad[:, pad:pad + C], w.grad, b.grad


def check(lengths, C, W, dtype=torch.float32, tol=1e-5, pad=0):
    torch.manual_seed(sum(lengths) + C)
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0)
    _, pos = segment_positions(cu)
    N = int(cu[-1])
    x = torch.randn(N, C, device=DEVICE, dtype=dtype)
    w = torch.randn(C, W, device=DEVICE) / W ** 0.5
    b = torch.randn(C, device=DEVICE)
    dy = torch.randn(N, C, device=DEVICE, dtype=dtype)
    ref = run(reference.short_conv, x.double(), w.double(), b.double(), pos, dy.double())
    got = run(short_conv, x, w, b, pos, dy, pad)
    for name, r, g in zip(("y", "dx", "dw", "db"), ref, got):
        assert g.dtype == (dtype if name in ("y", "dx") else torch.float32)
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("lengths", [[5, 0, 1, 3, 70, 2], [130], [0, 0]])
@pytest.mark.parametrize("C,W", [(20, 4), (8, 2), (12, 3)])
def test_short_conv_matches_reference(lengths, C, W):
    check(lengths, C, W)


def test_short_conv_reads_a_column_block_of_a_wider_array():
    check([5, 0, 1, 70], 20, 4, pad=3)


@pytest.mark.parametrize("split", [(16, 16, 8), (24, 40, 12), (8, 3)])
def test_short_conv_split_into_column_blocks(split):
    """One convolution over q | k | v, its output as separate contiguous arrays: each equals its block of
    the reference, and the gradients come back to the one input, taps and bias. The widths set the column
    tile (it must not straddle two arrays): 16, 8 and 8 here, with a ragged last array."""
    torch.manual_seed(7)
    C = sum(split)
    cu = torch.tensor([0, 5, 5, 6, 76], device=DEVICE)
    _, pos = segment_positions(cu)
    x = torch.randn(76, C + 5, device=DEVICE)[:, 2:C + 2]  # rows an odd distance apart
    w, b = torch.randn(C, 4, device=DEVICE) / 2, torch.randn(C, device=DEVICE)
    dys = [torch.randn(76, c, device=DEVICE) for c in split]
    outs = []
    for fn, blocks in ((reference.short_conv, None), (short_conv, split)):
        leaves = [t.double().requires_grad_() if blocks is None else t.clone().requires_grad_() for t in (x, w, b)]
        ys = fn(*leaves, pos) if blocks is None else fn(*leaves, pos, blocks)
        ys = ys.split(split, -1) if blocks is None else ys
        torch.autograd.backward(ys, [d.to(ys[0].dtype) for d in dys])
        outs.append([torch.cat(ys, 1)] + [t.grad for t in leaves])
        if blocks:
            assert all(y.is_contiguous() for y in ys) and [y.shape[1] for y in ys] == list(split)
    for name, r, g in zip(("y", "dx", "dw", "db"), *outs):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="must sum to"):
        short_conv(x, w, b, pos, split[:-1])
    with pytest.raises(ValueError, match="at most 3 blocks"):
        short_conv(x, w, b, pos, (C - 3, 1, 1, 1))


@pytest.mark.parametrize("use_rest", [True, False])
def test_short_conv_hands_back_the_columns_past_its_channels(use_rest):
    """x wider than the weight's channels (the MoM projections: q | k | v, then the gate columns): the
    other columns come back unchanged as one more array, and x's gradient is one array, the convolution's
    part in the first columns and the extra array's gradient (or zeros, unused) in the others."""
    from mom_bench.kernels import short_conv as dispatched

    torch.manual_seed(8)
    split, R = (16, 16, 8), 7
    C = sum(split)
    cu = torch.tensor([0, 5, 5, 6, 76], device=DEVICE)
    _, pos = segment_positions(cu)
    x = torch.randn(76, C + R, device=DEVICE)
    w, b = torch.randn(C, 4, device=DEVICE) / 2, torch.randn(C, device=DEVICE)
    dys = [torch.randn(76, c, device=DEVICE) for c in split] + [torch.randn(76, R, device=DEVICE)]
    ref_x = x[:, :C].double().requires_grad_()
    ref = reference.short_conv(ref_x, w.double(), b.double(), pos)
    ref.backward(torch.cat(dys[:3], 1).double())
    for fn in (short_conv, dispatched):
        xl = x.clone().requires_grad_()
        ys = fn(xl, w, b, pos, split)
        assert len(ys) == 4 and torch.equal(ys[3], x[:, C:])
        torch.autograd.backward(ys[:3] + ys[3:] * use_rest, dys[:3] + dys[3:] * use_rest)
        torch.testing.assert_close(torch.cat(ys[:3], 1).double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xl.grad[:, :C].double(), ref_x.grad, rtol=1e-5, atol=1e-5)
        assert torch.equal(xl.grad[:, C:], dys[3] if use_rest else torch.zeros_like(dys[3]))
    with pytest.raises(ValueError, match="must sum to"):
        short_conv(x[:, :C - 1], w[:C - 1], b[:C - 1], pos, split)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_gpu_short_conv(dtype, tol):
    check([1000, 0, 1, 3, 4096, 63, 64], 1024, 4, dtype, tol)
    check([1000, 0, 1, 3, 4096, 63, 64], 1024, 4, dtype, tol, pad=1024)
    check([1000, 0, 1, 3, 4096, 63, 64], 1024, 4, dtype, tol, pad=8)  # rows not 16-aligned: scalar loads
