"""The memory kinds built as transforms before the one core: KDA, negative eigenvalues, RetNet, Hedgehog,
(Gated) DeltaProduct. Each kind's core inputs come from its mixer's own transforms (`_gates`, `_features`,
`_sub_tokens`); recurrent and chunked references agree on them (fp64, every gradient, packed segments),
the Triton core agrees with the reference (CPU interpreter, fp32), and every mixer and MoM memory of these
kinds decodes with `prefill` + `step` what `forward` computes."""
import math

import pytest
import torch
import torch.nn.functional as F

from mom_bench import kernels
from mom_bench.config import ConfigError, RunConfig, validate
from mom_bench.kernels import reference as R
from mom_bench.models import KINDS, MIXERS, ModelConfig, build_mixer
from mom_bench.models.memory import MemoryMixer
from test_reference import grads
from test_triton_kernels import DEVICE, TC, TS, compare, run

H, K = 2, 8  # heads and head dim of the mixers below (their value dim is the head dim too)
TRANSFORM_PARAMETERS = ("A_log", "dt_bias", "fm_weight", "fm_bias")  # what the kinds' transforms learn
# name: (memory kind, mixer options)
ALGORITHMS = {
    "kda": ("kda", {}),
    "delta_negative_eigenvalues": ("delta", dict(negative_eigenvalues=True)),
    "gated_delta_negative_eigenvalues": ("gated_delta", dict(negative_eigenvalues=True)),
    "kda_negative_eigenvalues": ("kda", dict(negative_eigenvalues=True)),
    "retnet": ("retnet", {}),
    "hedgehog": ("hedgehog", {}),
    "delta_product": ("delta_product", dict(householder_steps=3)),
    "delta_product_negative_eigenvalues": ("delta_product", dict(negative_eigenvalues=True)),
}


def mixer_of(algo, head_dim=K, **kw):
    kind, options = ALGORITHMS[algo]
    torch.manual_seed(0)
    mixer = MemoryMixer(16, H, head_dim, kind=kind, conv_size=0, **options, **kw).double()
    with torch.no_grad():  # away from the initialisation, so that every parameter matters
        for p in (mixer.fm_weight, mixer.fm_bias) if mixer.kind.feature_map else ():
            p.add_(0.3 * torch.randn_like(p))
    return mixer


def raw_inputs(mixer, N, seed):
    """Random projected rows q | k | v | a | b (N, width) of a mixer, fp64, split as the mixer splits them."""
    gen = torch.Generator().manual_seed(seed)
    widths = [w for w in mixer.widths if w]
    return list(torch.randn(N, sum(widths), generator=gen, dtype=torch.float64).split(widths, -1))


def core_inputs(mixer, raw, B, T):
    """The mixer's transforms of raw rows (B * T tokens): q, k, v (B, n * T, H, D), g, beta for the core."""
    it = iter(raw)
    q, k, v = next(it), next(it), next(it)
    a = next(it) if mixer.widths[3] else None
    b = next(it) if mixer.widths[4] else None
    g, beta = mixer._gates(a, b, k)
    q, k, v, g, beta = mixer._sub_tokens(*mixer._features(q, k), v, g, beta)
    seq = lambda t, *d: None if t is None else t.reshape(B, mixer.n * T, *(d or t.shape[1:]))
    return seq(q, H, mixer.Kf), seq(k, H, mixer.Kf), seq(v, H, mixer.V), seq(g), seq(beta)


def core(form, mixer, B, T, cu=None, **kw):
    """(o, final state) of the reference `form` as a function of the raw rows and the initial state."""
    def fn(h0, *raw):
        q, k, v, g, beta = core_inputs(mixer, raw, B, T)
        return getattr(R, form)(q, k, v, g=g, beta=beta, delta=mixer.kind.delta, initial_state=h0,
                                normalize_qk=mixer.kind.normalize_qk,
                                cu_seqlens=None if cu is None else cu * mixer.n, **kw)
    return fn


@pytest.mark.parametrize("algo", ALGORITHMS)
@pytest.mark.parametrize("T,chunk", [(1, 16), (21, 8)])
def test_chunked_matches_recurrent(algo, T, chunk):
    """Output, final state and the gradient of every raw input, the initial state and the transforms'
    parameters (feature maps, decay parameters)."""
    mixer = mixer_of(algo)
    h0 = torch.randn(2, H, mixer.Kf, mixer.V, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    inputs = [h0] + raw_inputs(mixer, 2 * T, seed=T + chunk)
    learned = [name for name, _ in mixer.named_parameters() if name in TRANSFORM_PARAMETERS]
    results = []
    for form, kw in (("recurrent", {}), ("chunk", dict(chunk_size=chunk))):
        mixer.zero_grad()
        out = grads(core(form, mixer, 2, T, **kw), inputs)
        with_grad = {name: p.grad.clone() for name, p in mixer.named_parameters() if p.grad is not None}
        assert sorted(with_grad) == sorted(learned)
        results.append(out + list(with_grad.values()))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


LENS = [0, 1, 9, 0, 17, 1]


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_varlen_matches_separate_sequences(algo):
    """Packed segments (empty and length-1 ones among them): chunked = recurrent = each segment alone."""
    mixer = mixer_of(algo)
    cu = torch.tensor([0] + LENS).cumsum(0)
    h0 = torch.randn(len(LENS), H, mixer.Kf, mixer.V, dtype=torch.float64)
    raw = raw_inputs(mixer, sum(LENS), seed=3)
    o, s = core("chunk", mixer, 1, sum(LENS), cu, chunk_size=8)(h0, *raw)
    o_rec, s_rec = core("recurrent", mixer, 1, sum(LENS), cu)(h0, *raw)
    torch.testing.assert_close(o, o_rec, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s, s_rec, rtol=1e-9, atol=1e-9)
    n = mixer.n
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_i, s_i = core("chunk", mixer, 1, b - a, chunk_size=8)(h0[i:i + 1], *(x[a:b] for x in raw))
        torch.testing.assert_close(o[:, n * a:n * b], o_i)
        torch.testing.assert_close(s[i:i + 1], s_i)


@pytest.mark.parametrize("algo", [a for a in ALGORITHMS if a != "kda"])  # kda_negative_eigenvalues has its gate
def test_triton_core_matches_reference(algo):
    """The Triton chunked core (interpreter on the CPU, fp32) against the fp64 reference on each kind's core
    inputs, in packed segments with empty and length-1 ones: output, final state, every input's gradient."""
    mixer = mixer_of(algo, head_dim=8 if algo == "hedgehog" else 16)  # the core's K: 16 for every kind
    lens = [0, 1, 13, 0, 21]
    cu = torch.tensor([0] + lens).cumsum(0)
    with torch.no_grad():
        q, k, v, g, beta = core_inputs(mixer, raw_inputs(mixer, sum(lens), seed=4), 1, sum(lens))
    x = dict(q=q, k=k, v=v, g=g, beta=beta,
             initial_state=torch.randn(len(lens), H, 16, mixer.V, dtype=torch.float64))
    x = {name: t.to(DEVICE) for name, t in x.items() if t is not None}
    kw = dict(delta=mixer.kind.delta, normalize_qk=mixer.kind.normalize_qk, chunk_size=16,
              cu_seqlens=(cu * mixer.n).to(DEVICE))
    compare(run(TC.chunk, x, torch.float32, **kw), run(R.chunk, x, torch.float64, **kw), 2e-5)


@pytest.mark.parametrize("algo", ["kda_negative_eigenvalues", "delta_product_negative_eigenvalues"])
def test_triton_step_matches_reference(algo):
    """The Triton decoding step with beta above 1 (and a per-channel decay for KDA)."""
    mixer = mixer_of(algo, head_dim=16)
    with torch.no_grad():
        q, k, v, g, beta = core_inputs(mixer, raw_inputs(mixer, 3, seed=5), 3, 1)
    assert beta.max() > 1
    one = lambda t: None if t is None else t[:, 0].to(DEVICE)
    kw = dict(g=one(g), beta=one(beta), delta=True, normalize_qk=True)
    state = torch.randn(3, H, 16, 16, dtype=torch.float64).to(DEVICE)
    o_ref, s_ref = R.step(one(q), one(k), one(v), state, **kw)
    o, s = TS.step(*(one(t).float() for t in (q, k, v)), state.float(),
                   **{n: (t.float() if torch.is_tensor(t) else t) for n, t in kw.items()})
    compare({"o": o.double(), "state": s.double()}, {"o": o_ref, "state": s_ref}, 2e-6)


def test_delta_product_is_householder_steps_written_out():
    """A token of DeltaProduct decays the state once, then applies n delta-rule steps
    S <- (I - beta_j k_j k_j^T) S + beta_j k_j v_j^T with its j-th key, value and beta (L2-normalised keys),
    and reads with its one query after the last: the sub-token expansion against that loop by hand."""
    mixer = mixer_of("delta_product")
    n, T, V = mixer.n, 5, mixer.V
    raw = raw_inputs(mixer, T, seed=6)
    q, k, v, g, beta = core_inputs(mixer, raw, 1, T)
    with torch.no_grad():
        o, S = R.recurrent(q, k, v, g=g, beta=beta, delta=True, normalize_qk=True)
    q_raw, k_raw, v_raw, a, b = raw
    decay = (-mixer.A_log.exp() * F.softplus(a + mixer.dt_bias)).exp().detach()  # (T, H)
    beta = b.sigmoid().view(T, n, H)
    keys, values = R.l2norm(k_raw.view(T, n, H, K)), v_raw.view(T, n, H, V)
    state = torch.zeros(H, K, V, dtype=torch.float64)
    for t in range(T):
        for h in range(H):
            S_h = decay[t, h] * state[h]
            for j in range(n):
                kj = keys[t, j, h]
                S_h = (torch.eye(K, dtype=torch.float64) - beta[t, j, h] * torch.outer(kj, kj)) @ S_h \
                    + beta[t, j, h] * torch.outer(kj, values[t, j, h])
            state[h] = S_h
            qt = R.l2norm(q_raw.view(T, H, K)[t, h]) * K ** -0.5
            torch.testing.assert_close(o[0, n * t + n - 1, h], S_h.T @ qt)
    torch.testing.assert_close(S[0], state)


def test_kda_gate_is_a_per_channel_mamba_gate():
    """KDA (fla's KimiDeltaAttention): g[h, c] = -exp(A_log[h]) * softplus(a[h, c] + dt_bias[h, c]), beta =
    sigmoid(b); one A_log per head, one dt_bias per channel."""
    mixer = mixer_of("kda")
    assert mixer.A_log.shape == (H,) and mixer.dt_bias.shape == (H * K,) and mixer.widths[3] == H * K
    _, k, _, a, b = raw_inputs(mixer, 4, seed=7)
    with torch.no_grad():
        g, beta = mixer._gates(a, b, k)
    for i, h, c in [(0, 0, 0), (1, 1, 5), (3, 0, 7), (2, 1, 2)]:
        A, dt_bias = mixer.A_log[h].item(), mixer.dt_bias[h * K + c].item()
        want = -math.exp(A) * math.log1p(math.exp(a[i, h * K + c].item() + dt_bias))
        assert g[i, h, c].item() == pytest.approx(want, rel=1e-12)
    torch.testing.assert_close(beta, torch.sigmoid(b))


def core_calls(monkeypatch):
    """The keyword arguments of every call the mixers make to the chunked core, as they make them."""
    calls, real = [], kernels.chunk
    monkeypatch.setattr(kernels, "chunk", lambda *args, **kw: calls.append(kw) or real(*args, **kw))
    return calls


def test_retnet_decays_follow_the_formula(monkeypatch):
    """gamma_h = 1 - 2^(-5-h), the same at every token and not learned; what reaches the core is its log."""
    mixer = MemoryMixer(32, 4, kind="retnet", conv_size=0).double()
    assert mixer.widths[3] == 0 and not any("A_log" in n or "dt" in n for n, _ in mixer.named_parameters())
    calls = core_calls(monkeypatch)
    mixer(torch.randn(2, 7, 32, dtype=torch.float64))
    seen = calls[0]
    gamma = torch.tensor([1 - 2 ** (-5 - h) for h in range(4)], dtype=torch.float64)
    assert seen["g"].shape == (2, 7, 4) and seen["beta"] is None
    torch.testing.assert_close(seen["g"].exp(), gamma.expand(2, 7, 4), rtol=1e-14, atol=0)


def test_hedgehog_features_are_softmax_of_the_map_and_its_negation():
    """phi(x) = softmax([x W_h + b_h, -(x W_h + b_h)]) per head, separate maps for q and k; identity at
    initialisation; the state's key dim is 2K (and 2K must fit the kernels' 512)."""
    fresh = MemoryMixer(16, H, kind="hedgehog", conv_size=0).double()
    x = torch.randn(5, H * K, dtype=torch.float64)
    q, _ = fresh._features(x, x)
    xh = x.view(5, H, K)
    torch.testing.assert_close(q.view(5, H, 2 * K), torch.cat([xh, -xh], -1).softmax(-1))
    mixer = mixer_of("hedgehog")
    q, k = mixer._features(x, 2 * x)
    for feats, x_in, which in ((q, x, 0), (k, 2 * x, 1)):
        for h in range(H):
            y = x_in.view(5, H, K)[:, h] @ mixer.fm_weight[which, h] + mixer.fm_bias[which, h]
            torch.testing.assert_close(feats.view(5, H, 2 * K)[:, h], torch.cat([y, -y], -1).softmax(-1))
    assert not torch.allclose(q, mixer._features(x, x)[1])  # q and k have their own maps
    assert mixer.state_size(100) == {"total": H * 2 * K * K, "active": H * 2 * K * K}
    MemoryMixer(512, 2, kind="hedgehog")  # head dim 256: 512 features
    with pytest.raises(ValueError, match="twice the head dim .* 1024 .* exceeds the 512"):
        MemoryMixer(512, 1, kind="hedgehog")


def test_negative_eigenvalues_put_beta_in_0_2_and_only_under_the_delta_rule(monkeypatch):
    """The beta that reaches the core: in (0, 2), past 1, twice the plain one for the same logits."""
    calls = core_calls(monkeypatch)
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    for kind in ("delta", "gated_delta", "kda", "delta_product"):
        betas = {}
        for neg in (False, True):
            torch.manual_seed(1)
            mixer = MemoryMixer(16, H, kind=kind, negative_eigenvalues=neg).double()
            with torch.no_grad():
                mixer.w_in.mul_(8)  # large write-strength logits: beta near both ends of its range
            mixer(x)
            betas[neg] = calls[-1]["beta"]
        assert 0 < betas[True].min() and betas[True].max() < 2 and betas[True].max() > 1.9
        assert betas[False].max() < 1 and betas[True].min() < 0.1
        torch.testing.assert_close(betas[True], 2 * betas[False])  # the same model, the same logits
    for kind in (k for k, spec in KINDS.items() if not spec.delta):
        with pytest.raises(ValueError, match="negative_eigenvalues needs a delta-rule memory kind"):
            MemoryMixer(16, H, kind=kind, negative_eigenvalues=True)


@pytest.mark.parametrize("model,ok", [
    (dict(mixer="deltanet"), True), (dict(mixer="kda"), True), (dict(mixer="delta_product"), True),
    (dict(mixer="mom", memory="gated_delta"), True), (dict(mixer="mom", memory="kda"), True),
    (dict(mixer="mom", n_layers=2, pattern=["mom", "attention"]), True),
    (dict(mixer="gla"), False), (dict(mixer="retnet"), False), (dict(mixer="hedgehog"), False),
    (dict(mixer="mom", memory="linear"), False), (dict(mixer="gated_deltanet", n_layers=2,
                                                       pattern=["gated_deltanet", "mamba2"]), False)])
def test_validate_refuses_negative_eigenvalues_without_the_delta_rule(model, ok):
    cfg = RunConfig(model=ModelConfig(negative_eigenvalues=True, **model))
    if ok:
        validate(cfg)
    else:
        with pytest.raises(ConfigError, match="^model.negative_eigenvalues: needs delta-rule memories"):
            validate(cfg)


def test_validate_checks_householder_steps_and_hedgehogs_key_dim():
    with pytest.raises(ConfigError, match="^model.householder_steps: must be at least 1"):
        validate(RunConfig(model=ModelConfig(mixer="delta_product", householder_steps=0)))
    validate(RunConfig(model=ModelConfig(mixer="hedgehog", d_model=512, num_heads=2)))
    for model in (dict(mixer="hedgehog"), dict(mixer="mom", memory="hedgehog")):
        with pytest.raises(ConfigError, match="^model.head_dim: Hedgehog's features double it: 2 x 512"):
            validate(RunConfig(model=ModelConfig(d_model=512, num_heads=1, **model)))


def test_delta_product_steps_and_state_size():
    """n keys, values and betas per token (one decay); the state is the same H x K x V at any n."""
    one, three = (build_mixer("delta_product", ModelConfig(d_model=16, num_heads=H, householder_steps=n))
                  for n in (1, 3))
    assert three.widths[1:] == (3 * H * K, 3 * H * K, H, 3 * H) and one.widths[1:] == (H * K, H * K, H, H)
    assert one.state_size(64) == three.state_size(64) == {"total": H * K * K, "active": H * K * K}
    # n = 1 is Gated DeltaNet: the same parameters give the same function
    gdn = build_mixer("gated_deltanet", ModelConfig(d_model=16, num_heads=H))
    gdn.load_state_dict(one.state_dict())
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(one(x)[0], gdn(x)[0])


CASES = {name: dict(mixer=name) for name in ("kda", "retnet", "hedgehog", "delta_product")}
CASES.update({
    "delta_product_3_steps_negative_eigenvalues": dict(mixer="delta_product", householder_steps=3,
                                                      negative_eigenvalues=True),
    "deltanet_negative_eigenvalues": dict(mixer="deltanet", negative_eigenvalues=True),
    "kda_no_conv": dict(mixer="kda", conv_size=0),
    **{f"mom_{kind}": dict(mixer="mom", memory=kind) for kind in ("kda", "retnet", "hedgehog", "delta_product")},
    "mom_kda_negative_eigenvalues_no_shared": dict(mixer="mom", memory="kda", negative_eigenvalues=True,
                                                   shared_memory=False, num_memories=3, topk=1),
    "mom_delta_product_3_steps": dict(mixer="mom", memory="delta_product", householder_steps=3),
    # model.d_state: a key dim (4) below the head dim (8), the state d_state x head_dim per head
    **{f"{name}_d_state": dict(mixer=name, d_state=4) for name in ("mamba2", "gated_deltanet", "gla")},
    **{f"mom_{kind}_d_state": dict(mixer="mom", memory=kind, d_state=4) for kind in ("mamba2", "gated_delta", "gla")},
    "mamba2_d_state_no_conv": dict(mixer="mamba2", d_state=4, conv_size=0),
    "hedgehog_d_state": dict(mixer="hedgehog", d_state=4),
    "kda_d_state": dict(mixer="kda", d_state=4),
    "delta_product_d_state": dict(mixer="delta_product", d_state=4, householder_steps=3),
    "gla_d_state_wider": dict(mixer="gla", d_state=12),  # a key dim above the head dim
})


@pytest.mark.parametrize("case", CASES)
def test_prefill_and_step_reproduce_forward(case):
    """prefill over a prefix, then step token by token, equals forward over the whole sequence (fp64)."""
    kw = dict(CASES[case])
    cfg = ModelConfig(d_model=16, num_heads=H, chunk_size=8, **kw)
    torch.manual_seed(len(case))
    mixer = build_mixer(kw["mixer"], cfg).double()
    x = torch.randn(3, 14, 16, dtype=torch.float64)
    y, _ = mixer(x)
    for split in (0, 5):
        if split:
            out, state = mixer.prefill(x[:, :split])
            outs = [out]
        else:
            state, outs = mixer.init_state(3, x.device, torch.float64), []
        for t in range(split, x.shape[1]):
            y_t, state = mixer.step(x[:, t], state)
            outs.append(y_t[:, None])
        torch.testing.assert_close(torch.cat(outs, 1), y, rtol=1e-10, atol=1e-10)


def test_every_new_mixer_is_registered_with_its_kind():
    for name, kind in (("kda", "kda"), ("retnet", "retnet"), ("hedgehog", "hedgehog"),
                       ("delta_product", "delta_product")):
        assert MIXERS[name].keywords == dict(kind=kind, num_memories=0)


D_STATE = 4  # below the head dim K = 8 of the mixers here


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_d_state_sets_the_key_dim_and_the_state(kind):
    """model.d_state: q and k (and GLA's / KDA's per-channel decay, Hedgehog's map) d_state wide per head, v
    the head dim; the state (B, M, H, d_state (twice for Hedgehog), head_dim) from init_state and from
    prefill; state_size H x d_state x head_dim per memory."""
    mixer = MemoryMixer(16, H, kind=kind, num_memories=3, topk=2, d_state=D_STATE, chunk_size=8).double()
    n, Kf = mixer.n, (2 if mixer.kind.feature_map else 1) * D_STATE
    assert (mixer.K, mixer.Kf, mixer.V) == (D_STATE, Kf, K)
    assert mixer.widths[:3] == (H * D_STATE, n * H * D_STATE, n * H * K)
    assert mixer.widths[3] == {"channel": H * D_STATE, "channel_dt": H * D_STATE, None: 0, "fixed": 0}.get(
        mixer.kind.decay, H)
    assert mixer.conv.weight.shape[0] == sum(mixer.widths[:3])
    if kind == "kda":
        assert mixer.dt_bias.shape == (H * D_STATE,)
    if mixer.kind.feature_map:
        assert mixer.fm_weight.shape == (2, H, D_STATE, D_STATE)
    assert mixer.norm.weight.shape == (K,) and mixer.gate.out_features == mixer.out.in_features == H * K
    assert mixer.init_state(3, "cpu")["S"].shape == (3, 4, H, Kf, K)
    _, state = mixer.prefill(torch.randn(3, 6, 16, dtype=torch.float64))
    assert state["S"].shape == (3, 4, H, Kf, K)
    assert state["conv"].shape == mixer.init_state(3, "cpu")["conv"].shape
    per_memory = H * Kf * K
    assert mixer.state_size(64) == {"total": 4 * per_memory, "active": 3 * per_memory}


def test_d_state_reaches_the_core_as_the_key_dim(monkeypatch):
    """Mamba-2 with d_state: the core sees q, k (B, T, H, d_state) and v (B, T, H, head_dim)."""
    calls, real = [], kernels.chunk
    monkeypatch.setattr(kernels, "chunk", lambda q, k, v, **kw: calls.append((q, k, v)) or real(q, k, v, **kw))
    build_mixer("mamba2", ModelConfig(d_model=16, num_heads=H, d_state=D_STATE))(torch.randn(2, 7, 16))
    q, k, v = calls[0]
    assert q.shape == k.shape == (2, 7, H, D_STATE) and v.shape == (2, 7, H, K)


@pytest.mark.parametrize("kind", ["mamba2", "gated_delta", "gla", "kda", "hedgehog", "delta_product"])
def test_d_state_chunked_matches_recurrent(kind):
    """The core on a kind's inputs with K != V: chunked = recurrent, output, final state and gradients."""
    torch.manual_seed(0)
    mixer = MemoryMixer(16, H, K, kind=kind, conv_size=0, d_state=D_STATE).double()
    h0 = torch.randn(2, H, mixer.Kf, mixer.V, dtype=torch.float64)
    inputs = [h0] + raw_inputs(mixer, 2 * 13, seed=1)
    out = [grads(core(form, mixer, 2, 13, **kw), inputs) for form, kw in (("recurrent", {}),
                                                                           ("chunk", dict(chunk_size=4)))]
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_d_state_state_size_of_the_model_and_of_the_config():
    """Zoology's state size: layers x H x d_state x head_dim for Mamba-2 (2 layers of 2 heads of 8 here), the
    model's and the one the MoM study computes from a config alike; unset, head_dim x head_dim."""
    from dataclasses import asdict

    from mom_bench.models import build_model
    from mom_bench.study import config_state

    for model in (dict(mixer="mamba2"), dict(mixer="gla"), dict(mixer="hedgehog"),
                  dict(mixer="mom", memory="gated_delta", num_memories=3, topk=1)):
        for d_state in (None, D_STATE):
            cfg = ModelConfig(d_model=16, num_heads=H, n_layers=2, d_state=d_state, **model)
            got = build_model(cfg, 50).state_size(64)
            keys = (2 if model["mixer"] == "hedgehog" else 1) * (d_state or K)
            memories = (4, 2) if model["mixer"] == "mom" else (1, 1)
            assert got == {"total": 2 * memories[0] * H * keys * K, "active": 2 * memories[1] * H * keys * K}
            assert config_state(asdict(cfg)) == got
    assert config_state(dict(mixer="mamba2", d_model=64, num_heads=2, n_layers=2)) == {"total": 2 * 2 * 32 * 32,
                                                                                      "active": 2 * 2 * 32 * 32}


def test_d_state_is_checked():
    with pytest.raises(ConfigError, match="^model.d_state: must be in \\[1, 512\\]"):
        validate(RunConfig(model=ModelConfig(mixer="mamba2", d_state=0)))
    with pytest.raises(ConfigError, match="^model.d_state: must be in \\[1, 512\\]"):
        validate(RunConfig(model=ModelConfig(mixer="mamba2", d_state=513)))
    validate(RunConfig(model=ModelConfig(mixer="mamba2", d_state=16)))
    with pytest.raises(ValueError, match="model.d_state .* must be positive"):
        MemoryMixer(16, H, kind="mamba2", d_state=0)
    with pytest.raises(ValueError, match="twice the key dim \\(Hedgehog's features\\) 600 \\(model.d_state\\) exceeds"):
        build_mixer("hedgehog", ModelConfig(d_model=16, num_heads=H, d_state=300))
    assert build_mixer("gla", ModelConfig(d_model=16, num_heads=H)).K == K  # unset: the head dim
