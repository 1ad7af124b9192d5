"""The gated output norm's kernels against `reference.gated_rms_norm`: output and the gradients of the
input, the gate and the weight, on fresh random inputs. On the CPU they run in Triton's interpreter in
fp32; on a GPU (marked `gpu`) also in bf16 at the MoM layer's size."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from mom_bench.kernels import reference  # noqa: E402
from mom_bench.kernels.triton.norm import gated_rms_norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(fn, x, gate, w, dy):
    x, gate, w = (t.detach().clone().requires_grad_(True) for t in (x, gate, w))
    y = fn(x, gate, w, 1e-6)
    y.backward(dy.to(y.dtype))
    return [t.double() for t in (y, x.grad, gate.grad, w.grad)]


def check(N, H, V, dtype, tol):
    torch.manual_seed(N + V)
    x = torch.randn(N, H, V, device=DEVICE) * 3
    gate = torch.randn(N, H * V, device=DEVICE)
    w = 1 + torch.randn(V, device=DEVICE) / 4
    dy = torch.randn(N, H * V, device=DEVICE)
    rounded = [t.to(dtype) for t in (x, gate, w)]
    ref = run(reference.gated_rms_norm, *(t.double() for t in rounded), dy.to(dtype).double())
    got = run(gated_rms_norm, *rounded, dy)
    assert gated_rms_norm(*rounded).dtype == reference.gated_rms_norm(*rounded).dtype
    for name, r, g in zip(("y", "dx", "dgate", "dweight"), ref, got):
        assert g.shape == r.shape
        err = ((g - r).norm() / r.norm().clamp_min(1e-12)).item()
        assert err <= tol, f"{name}: relative error {err:.1e} > {tol:.0e}"


@pytest.mark.parametrize("N,H,V", [(37, 2, 24), (5, 3, 64), (0, 2, 16)])
def test_gated_rms_norm_matches_reference(N, H, V):
    """V not a power of two (masked channels), rows not a multiple of the row block, no rows at all."""
    check(N, H, V, torch.float32, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
def test_gpu_gated_rms_norm(dtype, tol):
    check(4096, 4, 256, dtype, tol)
    check(8192, 2, 64, dtype, tol)
