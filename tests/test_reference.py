"""The recurrent and chunked references compute the same function (fp64, fresh random inputs)."""
import pytest
import torch
import torch.nn.functional as F

from mom_bench.kernels import reference as R

# name: (per-channel decay, decay, beta, delta rule)
ALGORITHMS = {
    "linear_attention": (False, False, False, False),
    "head_decay": (False, True, False, False),
    "gla": (True, True, False, False),
    "delta_rule": (False, False, True, True),
    "gated_delta_rule": (False, True, True, True),
    "kda": (True, True, True, True),
}


def make_inputs(algo, B, T, H=2, K=8, V=6, seed=0):
    per_channel, decay, use_beta, delta = ALGORITHMS[algo]
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    kw = dict(delta=delta, normalize_qk=delta)
    if decay:
        kw["g"] = F.logsigmoid(r(B, T, H, K) if per_channel else r(B, T, H) + 2)
    if use_beta:
        kw["beta"] = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    return r(B, T, H, K), r(B, T, H, K), r(B, T, H, V), kw


def grads(fn, tensors, seed=1):
    """Output, final state and the gradient of a random projection of both wrt every input."""
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    o, s = fn(*tensors)
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + \
        (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    loss.backward()
    return [o.detach(), s.detach()] + [t.grad for t in tensors]


def call(form, q, k, v, h0, g, beta, kw, **extra):
    kw = {**kw, "g": g, "beta": beta}
    return getattr(R, form)(q, k, v, initial_state=h0, **kw, **extra)


@pytest.mark.parametrize("algo", ALGORITHMS)
@pytest.mark.parametrize("T,chunk", [(1, 16), (37, 16), (64, 64), (70, 32), (50, 64)])
def test_chunked_matches_recurrent(algo, T, chunk):
    q, k, v, kw = make_inputs(algo, B=2, T=T, seed=T * 7 + chunk)
    g, beta = kw.pop("g", None), kw.pop("beta", None)
    h0 = torch.randn(2, 2, 8, 6, dtype=torch.float64)
    inputs = [x for x in (q, k, v, h0, g, beta) if x is not None]

    def unpack(fn):
        def f(*ts):
            it = iter(ts)
            args = [next(it) if x is not None else None for x in (q, k, v, h0, g, beta)]
            return fn(*args)
        return f

    rec = grads(unpack(lambda *a: call("recurrent", *a, kw)), inputs)
    chk = grads(unpack(lambda *a: call("chunk", *a, kw, chunk_size=chunk)), inputs)
    for a, b in zip(rec, chk):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_varlen_matches_separate_sequences(algo):
    lens = [0, 1, 19, 0, 33, 16]
    T = sum(lens)
    q, k, v, kw = make_inputs(algo, B=1, T=T, seed=3)
    cu = torch.tensor([0] + lens).cumsum(0)
    h0 = torch.randn(len(lens), 2, 8, 6, dtype=torch.float64)
    o, s = R.chunk(q, k, v, initial_state=h0, cu_seqlens=cu, chunk_size=8, **kw)
    o_rec, s_rec = R.recurrent(q, k, v, initial_state=h0, cu_seqlens=cu, **kw)
    torch.testing.assert_close(o, o_rec, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s, s_rec, rtol=1e-9, atol=1e-9)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        sub = {key: (x[:, a:b] if torch.is_tensor(x) else x) for key, x in kw.items()}
        o_n, s_n = R.chunk(q[:, a:b], k[:, a:b], v[:, a:b], initial_state=h0[n:n + 1], chunk_size=8, **sub)
        torch.testing.assert_close(o[:, a:b], o_n)
        torch.testing.assert_close(s[n:n + 1], s_n)
        if a == b:  # an empty segment hands its initial state through untouched
            torch.testing.assert_close(s[n], h0[n])


def test_step_is_the_recurrence_written_out():
    """One gated delta step checked against the formula written by hand."""
    B, H, K, V = 1, 1, 4, 3
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(B, H, K, generator=gen, dtype=torch.float64), torch.randn(B, H, K, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, V, generator=gen, dtype=torch.float64)
    S = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    g, beta = torch.tensor([[-0.3]], dtype=torch.float64), torch.tensor([[0.7]], dtype=torch.float64)
    o, S1 = R.step(q, k, v, S, g=g, beta=beta, delta=True, scale=1.0)
    a, b, kk, vv, qq, S0 = 0.3, 0.7, k[0, 0], v[0, 0], q[0, 0], S[0, 0]
    expected = (torch.eye(K, dtype=torch.float64) - b * torch.outer(kk, kk)) @ (torch.exp(torch.tensor(-a)) * S0) \
        + b * torch.outer(kk, vv)
    torch.testing.assert_close(S1[0, 0], expected)
    torch.testing.assert_close(o[0, 0], expected.T @ qq)


def test_bad_shapes_raise_clear_errors():
    q = torch.randn(2, 5, 1, 4)
    with pytest.raises(ValueError, match="batch size must be 1"):
        R.chunk(q, q, q, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        R.chunk(q[:1], q[:1], q[:1], cu_seqlens=torch.tensor([0, 3, 2, 5]))
    with pytest.raises(ValueError, match="g must be"):
        R.chunk(q, q, q, g=torch.zeros(2, 5))
