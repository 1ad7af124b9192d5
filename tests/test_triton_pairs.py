"""MoM's pair packing kernels against `reference.pack_pairs` (a stable sort): every output equal, in the
same dtypes, on fresh random routings. On the CPU in Triton's interpreter at small shapes; on a GPU
(marked `gpu`) also at the benchmark shapes."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from mom_bench.kernels import reference  # noqa: E402
from mom_bench.kernels.triton.pairs import pack_pairs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check(B, T, E, k, shared):
    torch.manual_seed(B * T + 7 * E + k)
    index = torch.rand(B, T, E, device=DEVICE).argsort(-1)[..., :k]  # k distinct memories per token
    want = reference.pack_pairs(index, E, shared)
    got = pack_pairs(index, E, shared)
    for name, w, g in zip(("tok", "slots", "cu", "pos"), want, got):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), f"{name} differs from the reference"


@pytest.mark.parametrize("B,T,E,k,shared", [
    (3, 37, 4, 2, True),    # T not a multiple of the token block
    (2, 300, 5, 1, False),  # several token blocks per sequence: the carry between them
    (2, 90, 8, 3, True),    # E and k not powers of two
    (1, 1, 2, 2, True),     # every memory routed
    (2, 0, 3, 2, True),     # no tokens: every segment empty
    (1, 20, 1, 1, False),   # one memory
])
def test_pack_pairs_matches_reference(B, T, E, k, shared):
    check(B, T, E, k, shared)


def test_pack_pairs_leaves_memories_without_tokens_empty():
    index = torch.zeros(2, 5, 1, dtype=torch.long, device=DEVICE)  # every token to memory 0 of 3
    tok, slots, cu, pos = pack_pairs(index, 3, True)
    assert cu.tolist() == [0, 5, 10, 10, 10, 10, 10, 15, 20]
    assert torch.equal(pos, torch.arange(5, device=DEVICE).repeat(4))
    assert torch.equal(tok[slots], torch.arange(10, device=DEVICE)[:, None].expand(-1, 2))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("B,T", [(128, 512), (8, 2048), (1, 16384)])
def test_gpu_pack_pairs(B, T):
    check(B, T, 4, 2, True)
    check(B, T, 4, 2, False)
