"""BaseConv, Based and sliding-window attention: each against a naive form written here (fp64), decoding
(`step`, `prefill`) against `forward`, gradients, Based's feature map and its Triton run, the window's
mask, state sizes, the shipped configs and their checks."""
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mom_bench import kernels
from mom_bench.config import ConfigError, RunConfig, validate
from mom_bench.models import ModelConfig, build_mixer, build_model
from mom_bench.models.based import taylor_features
from mom_bench.models.layers import rotary

pytestmark = pytest.mark.usefixtures("one_thread")
D64 = torch.float64


def mixer(name, **kw):
    base = dict(d_model=12, num_heads=2, chunk_size=4, window=3, feature_dim=3, long_conv_len=32)
    return build_mixer(name, ModelConfig(**{**base, **kw})).double()


def decode(m, x, split):
    """prefill over x[:, :split] (init_state when split is 0), then step through the rest: (B, T, D)."""
    B = x.shape[0]
    if split:
        y0, state = m.prefill(x[:, :split])
        out = [y0]
    else:
        state, out = m.init_state(B, x.device, x.dtype), []
    for t in range(split, x.shape[1]):
        y, state = m.step(x[:, t], state)
        out.append(y[:, None])
    return torch.cat(out, 1)


def grads(fn, m, x, g):
    """Gradients of <fn(x), g> with respect to x and every parameter of m."""
    params = [p for _, p in sorted(m.named_parameters())]
    return torch.autograd.grad((fn(x) * g).sum(), [x, *params])


def assert_same_gradients(m, x, naive):
    x = x.clone().requires_grad_()
    g = torch.randn_like(x)
    for got, want in zip(grads(lambda t: m(t)[0], m, x, g), grads(naive, m, x, g)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------------- BaseConv
def naive_base_conv(m, x):
    """y_t = (sum_j w[:, j] u_{t-k+1+j} + b) * (u_t W^T + c) + u_t, token by token; the long form's taps
    from its position features (t / (l_max - 1), cos and -sin of 2 pi 1e-4 t / l_max) through its MLP."""
    B, T, D = x.shape
    if m.long_conv:
        j = torch.arange(T, dtype=D64)
        angle = 2 * math.pi * 1e-4 * j / m.l_max
        feats = torch.stack([j / (m.l_max - 1), angle.cos(), -angle.sin()], -1)
        l1, l2 = m.filter_mlp[0], m.filter_mlp[2]
        taps = torch.relu(feats @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias  # (T, D): tap j
    else:
        w, b = m.conv.weight[:, 0], m.conv.bias  # (D, k): w[:, k - 1] on the current token
    out = []
    for t in range(T):
        if m.long_conv:
            conv = sum(taps[j] * x[:, t - j] for j in range(t + 1)) + x[:, t]
        else:
            k = w.shape[1]
            conv = b + sum(w[:, k - 1 - j] * x[:, t - j] for j in range(min(k, t + 1)))
        out.append(conv * (x[:, t] @ m.projection.weight.T + m.projection.bias) + x[:, t])
    return torch.stack(out, 1)


@pytest.mark.parametrize("name,kernel", [("base_conv", 3), ("base_conv", 1), ("base_conv", 5), ("base_conv_long", 0)])
def test_base_conv_matches_its_naive_form_and_decodes_it(name, kernel):
    torch.manual_seed(kernel)
    m = mixer(name, base_conv_kernel=kernel or 3)
    x = torch.randn(2, 9, 12, dtype=D64)
    y, aux = m(x)
    assert aux is None
    torch.testing.assert_close(y, naive_base_conv(m, x), rtol=1e-10, atol=1e-10)
    for split in (0, 1, 2, 7):  # prefills shorter and longer than the short kernel's window
        torch.testing.assert_close(decode(m, x, split), y, rtol=1e-10, atol=1e-10)
    assert_same_gradients(m, x, lambda t: naive_base_conv(m, t))


def test_base_conv_long_filter_is_causal_and_bounded_by_l_max():
    torch.manual_seed(0)
    m = mixer("base_conv_long", long_conv_len=10)
    x = torch.randn(1, 10, 12, dtype=D64)
    y = m(x)[0]
    x2 = x.clone()
    x2[:, 6:] += 1.0  # the future does not reach the past
    torch.testing.assert_close(m(x2)[0][:, :6], y[:, :6], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="spans l_max=10 positions"):
        m(torch.randn(1, 11, 12, dtype=D64))


def test_base_conv_gradcheck():
    torch.manual_seed(1)
    for name in ("base_conv", "base_conv_long"):
        m = mixer(name, d_model=3)
        x = torch.randn(1, 5, 3, dtype=D64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: m(t)[0], (x,))


# ------------------------------------------------------------------------------------------------- Based
def test_taylor_feature_map_is_its_formula():
    torch.manual_seed(2)
    F_ = 5
    x, z = torch.randn(7, F_, dtype=D64), torch.randn(7, F_, dtype=D64)
    phi = taylor_features(x)
    assert phi.shape == (7, 1 + F_ + F_ * F_)
    assert (phi[:, 0] == 1).all()
    torch.testing.assert_close(phi[:, 1:F_ + 1], x / F_ ** 0.25)
    for i in range(F_):
        for j in range(F_):
            torch.testing.assert_close(phi[:, 1 + F_ + i * F_ + j], x[:, i] * x[:, j] / math.sqrt(2 * F_))
    s = (x * z).sum(-1) / math.sqrt(F_)  # the second-order Taylor expansion of exp(q.k / sqrt(F))
    torch.testing.assert_close((phi * taylor_features(z)).sum(-1), 1 + s + s * s / 2)


def naive_based(m, x):
    """y_t = sum_{s<=t} a_ts v_s / (sum_{s<=t} a_ts + eps), a_ts = 1 + c + c^2 / 2, c = q_t.k_s / sqrt(F),
    per head, then the output projection: the quadratic form, no feature map."""
    B, T, _ = x.shape
    H, Fd, V = m.H, m.F, m.V
    q = (x @ m.q.weight.T).view(B, T, H, Fd)
    k = (x @ m.k.weight.T).view(B, T, H, Fd)
    v = (x @ m.v.weight.T).view(B, T, H, V)
    c = torch.einsum("bthf,bshf->bhts", q, k) / math.sqrt(Fd)
    a = (1 + c + c * c / 2) * torch.ones(T, T, dtype=x.dtype).tril()
    y = torch.einsum("bhts,bshv->bthv", a, v) / (a.sum(-1).transpose(1, 2)[..., None] + m.eps)
    return y.reshape(B, T, H * V) @ m.out.weight.T


@pytest.mark.parametrize("heads,feature_dim", [(1, 4), (2, 3)])
def test_based_matches_its_naive_form_and_decodes_it(heads, feature_dim):
    torch.manual_seed(heads)
    m = mixer("based", num_heads=heads, feature_dim=feature_dim)
    assert m.K == 1 + feature_dim + feature_dim ** 2
    x = torch.randn(2, 11, 12, dtype=D64)  # 11 tokens over chunks of 4: a partial last chunk
    y = m(x)[0]
    torch.testing.assert_close(y, naive_based(m, x), rtol=1e-10, atol=1e-10)
    for split in (0, 1, 6):
        torch.testing.assert_close(decode(m, x, split), y, rtol=1e-10, atol=1e-10)
    assert_same_gradients(m, x, lambda t: naive_based(m, t))


def test_based_gradcheck():
    torch.manual_seed(3)
    m = mixer("based", d_model=4, num_heads=1, feature_dim=2, chunk_size=2)
    x = torch.randn(1, 5, 4, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t)[0], (x,))


@pytest.mark.parametrize("feature_dim", [4, 16])  # 21 features, and Based's 273 (the kernels' widest tiles)
def test_based_on_the_triton_core_matches_the_torch_core(feature_dim):
    """The interpreter runs the Triton kernels: forward, every gradient, prefill's state and the step."""
    torch.manual_seed(4)
    m = build_mixer("based", ModelConfig(d_model=16, num_heads=2, feature_dim=feature_dim, chunk_size=16))
    x = torch.randn(2, 20, 16)
    g = torch.randn(2, 20, 16)
    before = kernels.get_backend()
    runs = []
    try:
        for backend in ("torch", "triton"):
            kernels.set_backend(backend)
            xi = x.clone().requires_grad_()
            out = grads(lambda t: m(t)[0], m, xi, g)
            with torch.no_grad():
                y, state = m.prefill(x[:, :17])
                final, steps = state["S"], []
                for t in range(17, 20):
                    y_t, state = m.step(x[:, t], state)
                    steps.append(y_t)
            runs.append([m(x)[0].detach(), *out, final, *steps])
    finally:
        kernels.set_backend(before)
    for want, got in zip(*runs):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)


# --------------------------------------------------------------------------------------- sliding window
def naive_window(m, x, W):
    """Per position t and head: softmax over keys s in (t - W, t] of rotary q_t . rotary k_s / sqrt(D)."""
    B, T, _ = x.shape
    H, Dh = m.num_heads, m.head_dim
    q, k, v = (x @ m.qkv.weight.T).view(B, T, 3, H, Dh).unbind(2)
    pos = torch.arange(T)
    q, k = (rotary(t.transpose(1, 2), pos) for t in (q, k))  # (B, H, T, Dh)
    v = v.transpose(1, 2)
    out = []
    for t in range(T):
        lo = max(0, t - W + 1)
        w = torch.softmax(torch.einsum("bhd,bhsd->bhs", q[:, :, t], k[:, :, lo:t + 1]) / math.sqrt(Dh), -1)
        out.append(torch.einsum("bhs,bhsd->bhd", w, v[:, :, lo:t + 1]).flatten(1))
    return torch.stack(out, 1) @ m.out.weight.T


@pytest.mark.parametrize("window", [1, 3, 20])
def test_sliding_window_matches_its_naive_form_and_decodes_it(window):
    torch.manual_seed(window)
    m = mixer("sliding_window", window=window)
    x = torch.randn(2, 10, 12, dtype=D64)
    y = m(x)[0]
    torch.testing.assert_close(y, naive_window(m, x, window), rtol=1e-10, atol=1e-10)
    for split in (0, 1, 3, 4, 9):  # prefills shorter than, as long as and longer than the window
        torch.testing.assert_close(decode(m, x, split), y, rtol=1e-10, atol=1e-10)
    assert_same_gradients(m, x, lambda t: naive_window(m, t, window))


def test_sliding_window_sees_exactly_the_last_w_positions():
    """d y_t / d x_s is nonzero iff t - W < s <= t: position t never sees t - W."""
    torch.manual_seed(5)
    W, T = 3, 8
    m = mixer("sliding_window", window=W)
    x = torch.randn(1, T, 12, dtype=D64)
    jac = torch.autograd.functional.jacobian(lambda t: m(t)[0], x)[0, :, :, 0]  # (T, D, T, D)
    seen = jac.abs().sum((1, 3)) > 1e-12
    t, s = torch.arange(T)[:, None], torch.arange(T)[None]
    assert torch.equal(seen, (s <= t) & (s > t - W))


def exact_rotary(x, positions, base=10000.0):
    """models.layers.rotary in x's dtype: that one rounds to fp32, too coarse for gradcheck's differences."""
    half = x.shape[-1] // 2
    angles = positions.to(x.dtype)[:, None] * base ** (-torch.arange(half, dtype=x.dtype) / half)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * angles.cos() - x2 * angles.sin(), x1 * angles.sin() + x2 * angles.cos()], -1)


def test_sliding_window_gradcheck(monkeypatch):
    monkeypatch.setattr("mom_bench.models.sliding_window.rotary", exact_rotary)
    torch.manual_seed(6)
    m = mixer("sliding_window", d_model=4, num_heads=1, window=2)
    x = torch.randn(1, 6, 4, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t)[0], (x,))


# -------------------------------------------------------------------------------- state sizes and configs
def test_state_sizes_follow_zoology():
    d, L = 48, 1024
    cfg = dict(d_model=d, num_heads=1, feature_dim=8, window=16, base_conv_kernel=3)
    based = build_model(ModelConfig(pattern=["base_conv", "based"], n_layers=2, **cfg), 10).state_size(L)
    # BaseConv: d_model per tap; Based: (head_dim + 1) columns of its 1 + F + F (F + 1) / 2 unique features
    assert based["total"] == based["active"] == d * 3 + (d + 1) * (1 + 8 + 8 * 9 // 2)
    window = build_model(ModelConfig(pattern=["base_conv", "sliding_window"], n_layers=2, **cfg), 10)
    assert window.state_size(L)["total"] == d * 3 + 2 * d * 16  # the window's keys and values
    assert window.state_size(8) == window.state_size(L)  # whatever the length
    long = build_model(ModelConfig(mixer="base_conv_long", n_layers=1, **cfg), 10)
    assert long.state_size(L)["total"] == d * L  # an input per position
    heads = build_mixer("based", ModelConfig(d_model=d, num_heads=2, feature_dim=4))
    assert heads.state_size(L)["total"] == 2 * (d // 2 + 1) * (1 + 4 + 10)


def shipped(name):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(f"conf/model/{name}.yaml"))


def test_the_based_hybrid_builds_from_its_config_and_trains():
    cfg = shipped("based")
    assert list(cfg.pattern) == ["base_conv", "based"] and cfg.feature_dim == 16 and cfg.base_conv_kernel == 3
    torch.manual_seed(7)
    model = build_model(OmegaConf.to_object(OmegaConf.merge(cfg, dict(d_model=32, embed_dropout=0.0))), 30)
    assert [type(b.mixer).__name__ for b in model.blocks] == ["BaseConv", "Based"]
    assert model.blocks[1].mixer.K == 273
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 30, (4, 24))
    losses = []
    for _ in range(3):
        logits, _ = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_config_checks_of_the_zoology_mixers():
    def check(**model):
        validate(RunConfig(model=ModelConfig(**model)))

    for name in ("base_conv", "based", "sliding_window", "base_conv_long"):
        validate(OmegaConf.merge(OmegaConf.structured(RunConfig), {"model": OmegaConf.load(f"conf/model/{name}.yaml")}))
    with pytest.raises(ConfigError, match="^model.window"):
        check(mixer="sliding_window", window=0)
    with pytest.raises(ConfigError, match="^model.base_conv_kernel"):
        check(mixer="base_conv", base_conv_kernel=0)
    check(mixer="based", feature_dim=22)  # 1 + 22 + 484 = 507 features: the widest that fits
    with pytest.raises(ConfigError, match="^model.feature_dim"):
        check(mixer="based", feature_dim=23)
    with pytest.raises(ValueError, match="exceed the 512"):
        build_mixer("based", ModelConfig(feature_dim=23))
    with pytest.raises(ConfigError, match="^model.long_conv_len"):  # the default data's sequences are 64 long
        check(mixer="base_conv_long", long_conv_len=63)
    with pytest.raises(ConfigError, match="^model.head_dim"):  # rotary positions
        check(mixer="sliding_window", d_model=6, num_heads=2)
    check(mixer="base_conv", d_model=1024)  # no core, so no head-dim bound
