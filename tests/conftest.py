"""Shared fixtures, and the Triton interpreter switched on for every test where there is no GPU:
Triton's modules read TRITON_INTERPRET when they are imported, and any test module may be the first to
import them (the benchmark tools do at their top)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: small models on a 2-core machine shared with other jobs run ~10x slower with
    more threads than cores (used by the language-model test modules)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
