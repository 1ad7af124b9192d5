"""MoM's weighted combination kernels against `reference.combine`: output and the gradients of the pairs'
outputs and of the weights, on fresh random inputs with the slots a random permutation of the pairs. On
the CPU they run in Triton's interpreter in fp32; on a GPU (marked `gpu`) also in bf16 at layer size."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from mom_bench.kernels import reference  # noqa: E402
from mom_bench.kernels.triton.combine import combine  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(fn, o, slots, weight, dout, dtype):
    o, weight = (t.detach().clone().requires_grad_(True) for t in (o, weight))
    y = fn(o, slots, weight, dtype)
    y.backward(dout.to(y.dtype))
    return y, o.grad, weight.grad


def check(R, A, C, dtype, tol):
    torch.manual_seed(R * A + C)
    o = torch.randn(R * A, C, device=DEVICE).to(dtype)
    slots = torch.randperm(R * A, device=DEVICE).view(R, A)
    weight = torch.rand(R, A, device=DEVICE)
    dout = torch.randn(R, C, device=DEVICE)
    ref = run(reference.combine, o.double(), slots, weight.double(), dout.to(dtype).double(), torch.float64)
    got = run(combine, o, slots, weight, dout, dtype)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    for name, r, g in zip(("out", "do", "dweight"), ref, got):
        assert g.shape == r.shape
        err = ((g.double() - r).norm() / r.norm().clamp_min(1e-12)).item()
        assert err <= tol, f"{name}: relative error {err:.1e} > {tol:.0e}"


@pytest.mark.parametrize("R,A,C", [(37, 3, 24), (5, 1, 200), (0, 2, 16)])
def test_combine_matches_reference(R, A, C):
    """C not a power of two and over one column block, rows not a multiple of the row block, no rows."""
    check(R, A, C, torch.float32, 1e-6)


def test_combine_refuses_slots_that_do_not_cover_the_pairs():
    with pytest.raises(ValueError, match="exactly once"):
        combine(torch.zeros(7, 4), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-6)])
def test_gpu_combine(dtype, tol):
    check(16384, 3, 1024, dtype, tol)
    check(65536, 3, 128, dtype, tol)
