"""The backend switch: every mixer computes the same function on the Triton core as on the reference.

Without CUDA the Triton kernels run in the CPU interpreter at tiny fp32 shapes.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from mom_bench import kernels  # noqa: E402
from mom_bench.models import ModelConfig  # noqa: E402
from mom_bench.models import build_mixer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def backend():
    before = kernels.get_backend()
    yield kernels.set_backend
    kernels.set_backend(before)


def outputs_and_grads(mixer, x):
    x = x.detach().clone().requires_grad_(True)
    y, aux = mixer(x)
    (y * torch.linspace(-1, 1, y.numel(), device=x.device).view_as(y)).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in mixer.parameters()]
    mixer.zero_grad()
    return [y.detach()] + grads


@pytest.mark.parametrize("case", [dict(mixer="mom"), dict(mixer="mom", memory="gla", shared_memory=False),
                                  dict(mixer="gated_deltanet"), dict(mixer="mamba2")])
def test_mixer_on_triton_equals_reference(case, backend, monkeypatch):
    from mom_bench.kernels.triton import chunk as TC

    calls = []
    real = TC.chunk
    monkeypatch.setattr(TC, "chunk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(d_model=32, num_heads=2, chunk_size=16, num_memories=3, topk=2), **case})
    mixer = build_mixer(case["mixer"], cfg).to(DEVICE)
    x = torch.randn(2, 21, 32, device=DEVICE)
    backend("torch")
    ref = outputs_and_grads(mixer, x)
    backend("triton")
    got = outputs_and_grads(mixer, x)
    assert calls, "the triton backend did not reach the Triton kernels"
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-4)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of torch, triton, auto"):
        kernels.set_backend("cuda")


def test_auto_picks_triton_exactly_on_cuda(backend, monkeypatch):
    """`auto` sends CUDA tensors to the kernels and CPU tensors to the reference."""
    from mom_bench.kernels import reference
    from mom_bench.kernels.triton import chunk as TC

    calls = []
    monkeypatch.setattr(TC, "chunk", lambda *a, **kw: calls.append("triton"))
    monkeypatch.setattr(reference, "chunk", lambda *a, **kw: calls.append("torch"))
    backend("auto")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        q = torch.zeros(1, 4, 1, 8, device=device)
        kernels.chunk(q, q, q)
    assert calls == ["torch"] + (["triton"] if torch.cuda.is_available() else [])
    backend("torch")
    kernels.chunk(torch.zeros(1, 4, 1, 8, device=DEVICE), *[torch.zeros(1, 4, 1, 8, device=DEVICE)] * 2)
    assert calls[-1] == "torch"
