"""Every mixer: decoding with `step` reproduces `forward`, gradients reach every parameter, MoM's routing."""
import pytest
import torch

from mom_bench.models import ModelConfig
from mom_bench.models import MIXERS, build_mixer, build_model
from mom_bench.models.memory import _Gather, grouped_mm

VOCAB = 40
CASES = {name: dict(mixer=name) for name in MIXERS}
CASES.update({
    "mom_gla": dict(mixer="mom", memory="gla"),
    "mom_linear_no_shared": dict(mixer="mom", memory="linear", shared_memory=False),
    "mom_top1_of_3": dict(mixer="mom", num_memories=3, topk=1),
    "mom_mamba2": dict(mixer="mom", memory="mamba2"),
    "hybrid_swiglu": dict(pattern=["mom", "mom", "mom", "attention"], mlp="swiglu"),
})


def config(**kw):
    base = dict(d_model=24, num_heads=2, embed_dropout=0.0, chunk_size=8, num_memories=4, topk=2)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("case", CASES)
def test_step_decoding_reproduces_forward(case):
    torch.manual_seed(hash(case) % 1000)
    model = build_model(config(**CASES[case]), VOCAB).double().eval()
    ids = torch.randint(0, VOCAB, (3, 19))
    logits, _ = model(ids)
    state = model.init_state(3, dtype=torch.float64)
    stepped = []
    for t in range(ids.shape[1]):
        out, state = model.step(ids[:, t], state)
        stepped.append(out)
    torch.testing.assert_close(torch.stack(stepped, 1), logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES)
def test_gradients_reach_every_parameter(case):
    torch.manual_seed(0)
    model = build_model(config(**CASES[case]), VOCAB)
    ids = torch.randint(0, VOCAB, (4, 33))
    logits, aux = model(ids)
    (torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()) + aux).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_mom_groups_pairs_by_memory_then_sequence_then_time():
    torch.manual_seed(1)
    mixer = build_mixer("mom", config())
    B, T = 3, 50
    x = torch.randn(B * T, 24)
    pairs = mixer._layout(x, B, T)
    tok, cu = pairs.tok, pairs.cu
    per_memory = torch.diff(pairs.ends, prepend=pairs.ends.new_zeros(1)).tolist()
    _, weight, index = mixer._route(x)
    assert per_memory[:4] == [int((index == e).sum()) for e in range(4)]
    assert per_memory[4] == B * T  # the shared memory sees every token
    assert torch.equal(tok[cu[4 * B]:], torch.arange(B * T))  # in order, after the routed pairs
    assert torch.equal(pairs.ends.long(), cu[B::B])  # each memory's pairs end where its last segment does
    # Every token's slots point at its own pairs: its top-2 memories' segments, then the shared one's.
    segment_memory = torch.arange(5).repeat_interleave(B)  # segments are (memory, sequence), memory-major
    pair_memory = segment_memory.repeat_interleave(cu[1:] - cu[:-1])
    assert torch.equal(tok[pairs.slots], torch.arange(B * T)[:, None].expand(-1, 3))
    assert torch.equal(pair_memory[pairs.slots], torch.cat([index.reshape(-1, 2), torch.full((B * T, 1), 4)], 1))
    assert torch.equal(pairs.weight[:, :2], weight.reshape(-1, 2)) and (pairs.weight[:, 2] == 1).all()
    # every pair has exactly one slot (what the combination's backward relies on: no two slots collide)
    assert torch.equal(torch.sort(pairs.slots.flatten()).values, torch.arange(len(tok)))
    for n in range(len(cu) - 1):
        seg = tok[cu[n]:cu[n + 1]]
        assert (seg[1:] > seg[:-1]).all(), "tokens of one segment must be in time order"
        if len(seg):
            assert (seg // T == n % B).all(), "one segment holds one sequence"
    routed = tok[: cu[4 * B]]
    assert torch.equal(torch.sort(routed).values, torch.arange(B * T).repeat_interleave(2))


def test_mom_gather_has_index_select_gradients():
    """The layer's gather of tokens to pairs backpropagates as index_select."""
    torch.manual_seed(4)
    mixer = build_mixer("mom", config())
    pairs = mixer._layout(torch.randn(2 * 9, 24), 2, 9)
    x = torch.randn(18, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(len(pairs.tok), 5, dtype=torch.float64)
    got, = torch.autograd.grad(_Gather.apply(x, pairs.tok, pairs.slots), x, g)
    want, = torch.autograd.grad(x.index_select(0, pairs.tok), x, g)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_projection_equals_per_group_products(dtype):
    """The fused grouped product (with an empty group and a group at the end) equals each group's rows
    times its own matrix, in value and in the gradients of both inputs (fp64 loop as the reference)."""
    torch.manual_seed(5)
    x, w = torch.randn(40, 16, dtype=torch.float64), torch.randn(4, 16, 24, dtype=torch.float64)
    ends = torch.tensor([7, 7, 30, 40], dtype=torch.int32)
    g = torch.randn(40, 24, dtype=torch.float64)
    grads = []
    for t in (torch.float64, dtype):
        xt, wt = x.to(t).detach().requires_grad_(), w.to(t).detach().requires_grad_()
        y = grouped_mm(xt, wt, ends)
        y.backward(g.to(t))
        grads.append([y.double(), xt.grad.double(), wt.grad.double()])
    tol = dict(atol=0.3, rtol=0.03) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(grads[0][0][7:30], x[7:30] @ w[2])
    assert (grads[1][2][1] == 0).all()  # the empty group's matrix gets no gradient


def test_grouped_projection_under_autocast_runs_like_a_matmul():
    """Autocast leaves torch's grouped product in fp32; ours casts as for `x @ w` (bf16 here)."""
    torch.manual_seed(6)
    x, w = torch.randn(12, 16), torch.randn(2, 16, 8)
    ends = torch.tensor([5, 12], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_mm(x, w, ends)
        want = torch.cat([x[:5] @ w[0], x[5:] @ w[1]])
    assert y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y, want)


def test_mom_layer_equals_memories_run_one_by_one():
    """Each memory sees only its tokens, in order, untouched in between: rebuild the output by hand."""
    torch.manual_seed(2)
    mixer = build_mixer("mom", config(num_memories=3, topk=1, shared_memory=False)).double()
    x = torch.randn(1, 12, 24, dtype=torch.float64)
    y, _ = mixer(x)
    _, weight, index = mixer._route(x)
    # Running the layer on one memory's tokens alone, all forced to that memory, must reproduce those
    # tokens' outputs: no other token leaks into the memory's state or its short convolution.
    for e in range(3):
        t_e = (index[0, :, 0] == e).nonzero()[:, 0]
        if len(t_e):
            y_sub = run_single_memory(mixer, x[:, t_e], e)
            torch.testing.assert_close(y[0, t_e], y_sub[0], rtol=1e-10, atol=1e-10)


def run_single_memory(mixer, x, e):
    """The layer's output when every token of x goes to memory e with weight 1."""
    orig = mixer._route

    def forced(inp):
        probs, w, idx = orig(inp)
        return probs, torch.ones_like(w), torch.full_like(idx, e)

    mixer._route = forced
    try:
        return mixer(x)[0]
    finally:
        del mixer._route


def test_load_balancing_loss_matches_its_formula():
    torch.manual_seed(3)
    mixer = build_mixer("mom", config(num_memories=4, topk=2, aux_loss_coef=0.5))
    x = torch.randn(2, 30, 24)
    _, aux = mixer(x)
    probs, _, index = mixer._route(x)
    frac = torch.stack([(index == e).float().sum() for e in range(4)]) / index.numel()
    expected = 0.5 * 4 * (frac * probs.reshape(-1, 4).mean(0)).sum()
    torch.testing.assert_close(aux, expected)
    with torch.no_grad():
        mixer.router.weight.zero_()  # uniform router: the loss takes its minimum, coef * 1
    torch.testing.assert_close(mixer(x)[1], torch.tensor(0.5), rtol=1e-5, atol=1e-5)


def test_state_sizes_follow_zoology():
    cfg = config(d_model=64, num_heads=2)
    assert build_mixer("attention", cfg).state_size(512) == {"total": 2 * 64 * 512, "active": 2 * 64 * 512}
    assert build_mixer("gated_deltanet", cfg).state_size(512) == {"total": 2 * 32 * 32, "active": 2 * 32 * 32}
    mom = build_mixer("mom", cfg)  # 4 routed + shared, top-2
    assert mom.state_size(512) == {"total": 5 * 2 * 32 * 32, "active": 3 * 2 * 32 * 32}
    lm = build_model(ModelConfig(mixer="mom", d_model=64, num_heads=2, n_layers=3), 100)
    assert lm.state_size(64)["total"] == 3 * 5 * 2 * 32 * 32


def test_unknown_mixer_and_bad_topk_are_named():
    with pytest.raises(ValueError, match="unknown mixer 'foo'; known: attention, .*gated_deltanet.*, mom,"):
        build_mixer("foo", config())
    with pytest.raises(ValueError, match="topk must be in"):
        build_mixer("mom", config(num_memories=2, topk=3))


def test_heads_wider_than_the_kernels_are_refused_when_built():
    build_mixer("gla", config(d_model=512, num_heads=1))  # 512: the widest the Triton kernels take
    with pytest.raises(ValueError, match="head dim 1024 .* exceeds the 512"):
        build_mixer("gla", config(d_model=1024, num_heads=1))
    build_mixer("attention", config(d_model=1024, num_heads=1))  # SDPA has no such bound


def test_graphed_decoder_refuses_growing_state_and_the_cpu():
    from mom_bench.models import GraphedDecoder

    cfg = ModelConfig(mixer="attention", d_model=32, num_heads=2, n_layers=1)
    attn = build_model(cfg, 50)
    with pytest.raises(ValueError, match="attention's KV cache grows"):
        GraphedDecoder(attn, attn.init_state(2))
    mom = build_model(ModelConfig(mixer="mom", d_model=32, num_heads=2, n_layers=1), 50)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        GraphedDecoder(mom, mom.init_state(2))

