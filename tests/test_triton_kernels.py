"""The Triton core (kernels/triton/: chunk.py and step.py) against the PyTorch reference (fresh random inputs).

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before triton is
imported) at tiny fp32 shapes, compared with the reference computed in fp64: output, final state and the
gradient of every input. The tests marked `gpu` repeat the comparisons on CUDA at real sizes in fp32
and bf16 (tiny tests run on the GPU too when there is one).
"""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from mom_bench.kernels import reference as R  # noqa: E402
from mom_bench.kernels.triton import chunk as TC, step as TS  # noqa: E402


def reload_core():
    """Imports the core's modules again, each after those it imports from, so that their kernels are
    decorated for the interpreter (they were imported before it was switched on)."""
    for name in ("env", "jit", "chunk_fwd", "chunk_bwd", "chunk", "step"):
        importlib.reload(importlib.import_module(f"mom_bench.kernels.triton.{name}"))


if not CUDA and not TC.INTERPRET and os.environ.get("TRITON_INTERPRET") == "1":
    reload_core()  # in place: TC and TS are these modules

DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not CUDA and not TC.INTERPRET, reason="needs CUDA or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# name: (decay: None, "head" (B, T, H) or "channel" (B, T, H, K); beta; delta rule)
ALGORITHMS = {
    "linear_attention": (None, False, False),
    "head_decay": ("head", False, False),
    "gla": ("channel", False, False),
    "delta_rule": (None, True, True),
    "gated_delta_rule": ("head", True, True),
    "kda": ("channel", True, True),
}
NAMES = ["q", "k", "v", "g", "beta", "initial_state"]


def make_inputs(algo, B, T, H, K, V, seed, h0=True, N=None, spec=None):
    """fp64 inputs on DEVICE. Keys have norm about 1, so the delta rule is stable without normalize_qk."""
    decay, use_beta, delta = spec or ALGORITHMS[algo]
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device=DEVICE, dtype=torch.float64)
    x = dict(q=r(B, T, H, K), k=r(B, T, H, K) * K ** -0.5, v=r(B, T, H, V))
    if decay == "head":
        x["g"] = F.logsigmoid(r(B, T, H) + 2)
    if decay == "channel":
        x["g"] = F.logsigmoid(r(B, T, H, K))
    if use_beta:
        x["beta"] = torch.rand(B, T, H, generator=gen, device=DEVICE, dtype=torch.float64)
    if h0:
        x["initial_state"] = r(N or B, H, K, V)
    return x, delta


def run(fn, inputs, dtype, use=("o", "state"), seed=1, **kw):
    """Output, final state and the gradients of a random projection of both, all as fp64.

    q, k, v and beta go in as `dtype`, g and the initial state as fp32 (fp64 for the fp64 reference);
    the projection weights are rounded to the output's dtype so both sides see the same do."""
    aux = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = {n: x.detach().to(aux if n in ("g", "initial_state") else dtype).requires_grad_(True)
              for n, x in inputs.items()}
    o, s = fn(**leaves, **kw)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    w_o = torch.randn(o.shape, generator=gen, device=DEVICE).to(o.dtype).double()
    w_s = torch.randn(s.shape, generator=gen, device=DEVICE).double()
    loss = (o.double() * w_o).sum() * ("o" in use) + (s.double() * w_s).sum() * ("state" in use)
    loss.backward()
    out = {"o": o.detach().double(), "final_state": s.detach().double()}
    for n in NAMES:  # a reference's input that no token reads (T = 0) gets no gradient
        if n in leaves:
            grad = leaves[n].grad
            out["d" + n] = (torch.zeros_like(leaves[n]) if grad is None else grad).double()
    return out


def compare(got, ref, tol, metric="max"):
    """Relative errors: max |got - ref| / max |ref| ("max") or ||got - ref|| / ||ref|| ("rms")."""
    bad = []
    for name, r in ref.items():
        g = got[name]
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        if r.numel() == 0:
            continue
        if metric == "max":
            err = ((g - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
        else:
            err = ((g - r).norm() / r.norm().clamp_min(1e-12)).item()
        t = tol[name] if isinstance(tol, dict) else tol
        if not err <= t:
            bad.append(f"{name}: {err:.2e} > {t:.0e}")
    assert not bad, "; ".join(bad)


def check(algo, B, T, H, K, V, chunk, h0, norm, seed, tol=2e-5, spec=None, cu_seqlens=None, N=None,
          scale=None, dtype=torch.float32, metric="max"):
    inputs, delta = make_inputs(algo, B, T, H, K, V, seed, h0=h0, N=N, spec=spec)
    kw = dict(delta=delta, normalize_qk=norm, chunk_size=chunk, cu_seqlens=cu_seqlens, scale=scale)
    rounded = {n: (x.to(dtype).double() if n in ("q", "k", "v", "beta") else x) for n, x in inputs.items()}
    ref = run(R.chunk, rounded, torch.float64, **kw)
    got = run(TC.chunk, inputs, dtype, **kw)
    compare(got, ref, tol, metric)


# ---------------------------------------------------------------------------------------------------
# Tiny shapes: the CPU interpreter (or the GPU when there is one), fp32
# ---------------------------------------------------------------------------------------------------

# (chunk, initial state, normalize_qk, B, H): T = 45 is a multiple of neither chunk size.
CASES = {
    "c16": (16, False, False, 2, 1),
    "c16_h0_norm": (16, True, True, 1, 2),
    "c32_h0": (32, True, False, 2, 1),
    "c32_norm": (32, False, True, 1, 2),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_chunk_matches_reference(algo, case):
    chunk, h0, norm, B, H = CASES[case]
    check(algo, B, 45, H, 16, 32, chunk, h0, norm, seed=hash((algo, case)) % 2**31)


@pytest.mark.parametrize("spec", [(None, True, False), ("head", False, True), ("channel", False, True)],
                         ids=["beta_without_delta", "gated_delta_without_beta", "kda_without_beta"])
def test_other_switches(spec):
    """beta scales a plain write; the delta rule without beta (beta = 1); K > V, explicit scale."""
    check(None, 1, 21, 1, 32, 16, 16, True, False, seed=5, spec=spec, scale=0.3)


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_k_and_v_blocks(algo, norm, monkeypatch):
    """Blocks of 16 for K = 40 and V = 24: the loops over K and V blocks run several times, with masked
    tails, and under normalize_qk the dq/dk scratch pass runs (it needs more than one K block)."""
    monkeypatch.setattr(TC, "CONFIG_OVERRIDES", dict(BK=16, BV=16, BV_h=16, BK_dqk=16, BK_dqk_channel=16,
                                                     BV_dqk=16))
    check(algo, 1, 45, 1, 40, 24, 32, True, norm, seed=hash((algo, norm)) % 2**31)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_state_in_wide_key_tiles(algo, monkeypatch):
    """K = 100 in blocks of 16: 7 key blocks for the chunk kernels, while the sequential kernels hold the
    state as 4 tiles of 32 rows (the last one masked), as they hold K = 512 in 4 tiles of 128."""
    monkeypatch.setattr(TC, "CONFIG_OVERRIDES", dict(BK=16, BK_dqk=16, BK_dqk_channel=16))
    cfg = TC._config(100, 24, 32)
    assert (cfg["BK"], cfg["BK_h"]) == (16, 32)
    check(algo, 1, 45, 1, 100, 24, 32, True, True, seed=hash(algo) % 2**31)


def test_head_dims_up_to_512():
    """Every head dim up to 512 has a configuration whose state fits 4 tiles; wider ones are refused."""
    for K in (16, 64, 100, 256, 300, 512):
        cfg = TC._config(K, K, 64)
        assert -(-K // cfg["BK_h"]) <= 4 and cfg["BK_h"] % cfg["BK"] == 0
    assert TC._config(512, 512, 64)["BV_h"] == 16
    with pytest.raises(ValueError, match="up to 512"):
        TC._config(513, 64, 64)


@pytest.mark.parametrize("algo", ["gla", "kda"])
def test_per_channel_sub_chunks(algo, monkeypatch):
    """Sub-chunks of 8 in chunks of 32: pairs across three sub-chunk boundaries, and decays so strong
    (about e^-9 per token, e^-280 over a chunk) that a product factored over the whole chunk overflows."""
    monkeypatch.setattr(TC, "CONFIG_OVERRIDES", dict(BC=8))
    inputs, delta = make_inputs(algo, 1, 45, 2, 16, 16, seed=21)
    inputs["g"] = inputs["g"] * 10 - 1
    kw = dict(delta=delta, normalize_qk=True, chunk_size=32)
    compare(run(TC.chunk, inputs, torch.float32, **kw), run(R.chunk, inputs, torch.float64, **kw), 2e-5)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_bf16_products(algo):
    """bf16 inputs take the bf16-operand products of the sequential and o kernels (`_Plan.dot16`);
    against the fp64 reference. A wrong operand would be off by O(1); bf16 rounding alone (inputs,
    outputs and the stored intermediates) gives up to 1.2e-2 here with those products in tf32 and 1.4e-2
    with them in bf16 (dk of the delta rule), more than at the GPU tests' sizes (1e-2), whose sums are
    longer."""
    lens = [0, 45, 20]
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0)
    check(algo, 1, sum(lens), 2, 32, 16, 16, True, True, seed=13, cu_seqlens=cu, N=len(lens),
          dtype=torch.bfloat16, tol=2e-2, metric="rms")


def test_pipeline_stages_by_operands_and_shared_memory(monkeypatch):
    """2 stages for the sequential kernels only with bf16 operands, on a GPU with Hopper's shared memory,
    and not for the per-channel decay's reverse kernel (it does not fit there); 1 for everything else."""
    def stages(dtype, decay, smem, kernel):
        monkeypatch.setattr(TC, "_max_shared_mem", lambda device: smem)
        q = torch.zeros(1, 16, 1, 256, dtype=dtype, device=DEVICE)
        g = {None: None, "head": torch.zeros(1, 16, 1), "channel": torch.zeros(1, 16, 1, 256)}[decay]
        p = TC._Plan(q, q, q, g, None, True, None, None, False, 64)
        return p.launch("_h", kernel)["num_stages"]
    hopper, a100 = 227 * 1024, 163 * 1024
    assert [stages(torch.bfloat16, "head", hopper, k) for k in ("h", "dh", "o", "dqk")] == [2, 2, 1, 1]
    assert [stages(torch.bfloat16, "channel", hopper, k) for k in ("h", "dh")] == [2, 1]
    assert [stages(torch.bfloat16, None, hopper, k) for k in ("h", "dh")] == [2, 2]
    assert [stages(torch.float32, "head", hopper, k) for k in ("h", "dh")] == [1, 1]
    assert [stages(torch.float16, "head", hopper, k) for k in ("h", "dh")] == [1, 1]
    assert [stages(torch.bfloat16, "head", a100, k) for k in ("h", "dh")] == [1, 1]


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_varlen_with_empty_and_short_segments(algo):
    lens = [0, 1, 17, 0, 33, 16, 2]
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0)
    check(algo, 1, sum(lens), 1, 16, 32, 16, True, ALGORITHMS[algo][2], seed=11, cu_seqlens=cu, N=len(lens))


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_backward_in_segment_groups(algo, monkeypatch):
    """A workspace budget of one byte splits the backward into groups of whole segments (here 4, with
    empty segments inside groups and a group of one segment); the gradients must not change."""
    monkeypatch.setattr(TC, "WORKSPACE_BYTES", 1)
    monkeypatch.setattr(TC, "MIN_CHAINS", 1)
    seen, groups = [], TC._groups
    monkeypatch.setattr(TC, "_groups", lambda p: seen.append(groups(p)) or seen[-1])
    lens = [0, 1, 17, 0, 33, 16, 2]
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0)
    check(algo, 1, sum(lens), 1, 16, 32, 16, True, ALGORITHMS[algo][2], seed=12, cu_seqlens=cu, N=len(lens))
    assert [bounds for _, bounds in seen[0]] == [(0, 3, 0, 18), (3, 5, 18, 51), (5, 6, 51, 67), (6, 7, 67, 69)]


@pytest.mark.parametrize("keep", ["all", "states", "none", "rows", "groups_none"])
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_backward_keeps_or_recomputes(algo, keep, monkeypatch):
    """Within KEEP_BYTES the backward reads what the forward kept instead of recomputing it. In one group:
    everything (no second prep or sequential launch), or only the chunk states and v_new when just they
    fit (a second prep launch), or nothing with a budget of 0 (both again). In groups ("rows", here 2):
    prep's output and v_new, so each group runs only the sequential pass, which under the delta rule forms
    the states from v_new (no delta rule in that launch); or nothing ("groups_none": both per group). The
    gradients match the reference every way, with empty segments and an initial state."""
    if keep in ("rows", "groups_none"):
        monkeypatch.setattr(TC, "WORKSPACE_BYTES", 1)
        monkeypatch.setattr(TC, "MIN_CHAINS", 1)
    if keep in ("none", "groups_none"):
        monkeypatch.setattr(TC, "KEEP_BYTES", 0)
    if keep == "states":  # a budget of exactly the states and v_new
        real_keep = TC._keep

        def keep_states(s, grouped):
            nbytes = [s[n].numel() * s[n].element_size() for n in TC.SEQUENTIAL if s[n] is not None]
            monkeypatch.setattr(TC, "KEEP_BYTES", sum(nbytes))
            return real_keep(s, grouped)

        monkeypatch.setattr(TC, "_keep", keep_states)
    launches = {"_prep_kernel": [], "_h_fwd_kernel": []}

    def counted(name, kernel):
        class Counted:
            def __getitem__(self, grid):
                def launch(*args, **kw):
                    launches[name].append(kw["DELTA"])
                    return kernel[grid](*args, **kw)
                return launch
        return Counted()

    for name in launches:
        monkeypatch.setattr(TC, name, counted(name, getattr(TC, name)))
    lens = [0, 1, 17, 0, 33]
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0)
    delta = ALGORITHMS[algo][2]
    check(algo, 1, sum(lens), 1, 16, 32, 16, True, delta, seed=13, cu_seqlens=cu, N=len(lens))
    prep, sequential = dict(all=(1, 1), states=(2, 1), none=(2, 2), rows=(1, 3), groups_none=(3, 3))[keep]
    assert len(launches["_prep_kernel"]) == prep
    assert launches["_h_fwd_kernel"] == [delta] + [delta and keep != "rows"] * (sequential - 1)


@pytest.mark.parametrize("algo", [a for a, (_, _, delta) in ALGORITHMS.items() if delta])
def test_grouped_backward_equals_one_group_in_bf16(algo, monkeypatch):
    """In groups the backward forms the chunk states again from the v_new the forward stored (in bf16 for
    bf16 inputs), and one group reads the states the forward kept: both must be the same states, so the
    gradients are equal bit for bit (the forward's state update takes v_new as stored)."""
    lens = [0, 37, 20]
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0)
    inputs, delta = make_inputs(algo, 1, sum(lens), 1, 32, 16, seed=14, N=len(lens))
    kw = dict(delta=delta, normalize_qk=True, chunk_size=16, cu_seqlens=cu)
    one = run(TC.chunk, inputs, torch.bfloat16, **kw)
    monkeypatch.setattr(TC, "WORKSPACE_BYTES", 1)
    monkeypatch.setattr(TC, "MIN_CHAINS", 1)
    grouped = run(TC.chunk, inputs, torch.bfloat16, **kw)
    for name, x in one.items():
        assert torch.equal(grouped[name], x), name


@pytest.mark.parametrize("tokens,segments,H,K,groups", [
    (3 * 16384, 40, 4, 256, 2),  # MoM layer, B8 x T2048: about 1.1 GB of workspace, 160 chains
    (3 * 16384, 5, 4, 256, 1),  # B1 x T16384: 20 chains, too few to split
    (3 * 65536, 640, 2, 64, 1),  # MQAR size: about 0.4 GB, under the budget
])
def test_backward_groups_at_benchmark_shapes(tokens, segments, H, K, groups):
    """How many groups the backward plans at the MoM benchmark shapes (bf16, equal segments)."""
    q = torch.empty(1, 1, H, K, dtype=torch.bfloat16, device=DEVICE).expand(1, tokens, H, K)
    cu = torch.arange(segments + 1) * (tokens // segments)  # on the host: the plan needs no copy
    cu[-1] = tokens
    plan = TC._Plan(q, q, q, None, None, True, None, cu, True, 64)
    assert len(TC._groups(plan)) == groups


@pytest.mark.parametrize("lens", [[5], [64, 0, 1, 130, 0], list(range(0, 700, 3)), [(n * 37) % 50 for n in range(300)],
                                  [], [0, 0]],
                         ids=["one", "empty_and_partial", "many_blocks", "ties", "no_segments", "all_empty"])
def test_chunk_layout(lens):
    """Every chunk's (segment, chunk in segment), every segment's chunk offset and the order of the
    segments (most chunks first, ties in segment order), against a loop; the chunks past the real ones
    point past the last segment's end. 234 segments of up to 699 tokens take several segment blocks and
    chunk programs; 300 segments with many equal chunk counts take two blocks of the order's comparisons."""
    BT = 16
    cu = F.pad(torch.tensor(lens, dtype=torch.long).cumsum(0), (1, 0)).to(DEVICE, torch.int32)
    cidx, coff, order, NT = TC._chunk_layout(cu, BT, sum(lens))
    assert order.tolist() == sorted(range(len(lens)), key=lambda n: (-((lens[n] + BT - 1) // BT), n))
    want, offsets = [], [0]
    for n, length in enumerate(lens):
        want += [(n, c) for c in range(-(-length // BT))]
        offsets.append(len(want))
    want += [(len(lens) - 1, c - offsets[-2]) for c in range(len(want), NT)]
    assert NT == -(-sum(lens) // BT) + len(lens)
    assert coff.tolist() == offsets
    assert [tuple(r) for r in cidx.tolist()] == want


@pytest.mark.skipif(CUDA, reason="a device-side assert would end the CUDA context of the other tests")
@pytest.mark.parametrize("cu,total", [([0, 5, 3, 9], 9), ([1, 5, 9], 9), ([0, 5, 9], 10)])
def test_chunk_layout_checks_cu_seqlens(cu, total):
    with pytest.raises(RuntimeError, match="must rise"):
        TC._chunk_layout(torch.tensor(cu, dtype=torch.int32), 16, total)


def test_empty_sequences():
    cu = torch.zeros(3, dtype=torch.long, device=DEVICE)
    check("gated_delta_rule", 1, 0, 2, 16, 16, 16, True, True, seed=2, cu_seqlens=cu, N=2)
    check("head_decay", 2, 0, 1, 16, 16, 16, True, False, seed=2)


@pytest.mark.parametrize("use", [("o",), ("state",)], ids=["output_only", "state_only"])
def test_loss_of_one_output_and_no_initial_state(use):
    """The gradient of an output the loss ignores comes as None; chunk_size 8 is a hint (16 is used)."""
    inputs, delta = make_inputs("gated_delta_rule", 2, 20, 1, 16, 16, seed=3, h0=False)
    kw = dict(delta=delta, normalize_qk=True, chunk_size=8)
    ref = run(R.chunk, inputs, torch.float64, use=use, **kw)
    got = run(TC.chunk, inputs, torch.float32, use=use, **kw)
    compare(got, ref, 2e-5)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_step_matches_reference(algo):
    delta = ALGORITHMS[algo][2]
    B, H, K, V = 2, 2, 16, 32
    x, _ = make_inputs(algo, B, 1, H, K, V, seed=7)
    one = {n: (t[:, 0] if n != "initial_state" else t) for n, t in x.items()}
    kw = dict(q=one["q"], k=one["k"], v=one["v"], g=one.get("g"), beta=one.get("beta"), delta=delta,
              normalize_qk=delta)
    o_ref, s_ref = R.step(state=one["initial_state"], **kw)
    o, s = TS.step(state=one["initial_state"].float(), **{n: (t.float() if torch.is_tensor(t) else t)
                                                                   for n, t in kw.items()})
    compare({"o": o.double(), "state": s.double()}, {"o": o_ref, "state": s_ref}, 2e-6)


@pytest.mark.parametrize("algo", ["gated_delta_rule", "kda", "linear_attention"])
def test_step_into_a_pool_updates_only_the_indexed_rows(algo):
    """With index, step reads and writes rows of a state pool in place: the indexed rows (taken in
    an order unlike the batch's) become the reference's new states, the other rows stay as they were."""
    delta = ALGORITHMS[algo][2]
    B, H, K, V, N = 3, 2, 16, 32, 7
    x, _ = make_inputs(algo, B, 1, H, K, V, seed=11)
    kw = {n: t[:, 0].float() for n, t in x.items() if n != "initial_state"}
    pool = torch.randn(N, H, K, V, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    index = torch.tensor([5, 0, 3], device=DEVICE)
    o_ref, s_ref = R.step(state=pool[index].double(), **{n: t.double() for n, t in kw.items()}, delta=delta,
                          normalize_qk=delta)
    want = pool.clone()
    want[index] = s_ref.float()
    got = pool.clone()
    o, out = TS.step(state=got, **kw, delta=delta, normalize_qk=delta, index=index)
    assert out.data_ptr() == got.data_ptr()
    compare({"o": o.double(), "pool": got.double()}, {"o": o_ref, "pool": want.double()}, 2e-6)
    # The reference's pool form does the same.
    ref_pool = pool.clone()
    R.step(state=ref_pool, **kw, delta=delta, normalize_qk=delta, index=index)
    compare({"pool": ref_pool.double()}, {"pool": want.double()}, 2e-6)


def test_step_into_a_pool_refuses_what_it_cannot_update_in_place():
    x, _ = make_inputs("gated_delta_rule", 2, 1, 2, 16, 16, seed=1)
    kw = {n: t[:, 0].float() for n, t in x.items() if n != "initial_state"}
    pool = torch.zeros(16, 2, 16, 4, device=DEVICE).transpose(0, 3)  # (4, 2, 16, 16), not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        TS.step(state=pool, **kw, delta=True, index=torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(ValueError, match="pool"):
        TS.step(state=torch.zeros(4, 2, 16, 8, device=DEVICE), **kw, delta=True,
                       index=torch.tensor([0, 1], device=DEVICE))


@pytest.mark.parametrize("algo", ["gated_delta_rule", "kda"])
def test_decoding_continues_the_chunked_form(algo):
    """chunk over a prefix, then step token by token, equals chunk over all."""
    delta = ALGORITHMS[algo][2]
    x, _ = make_inputs(algo, 1, 20, 2, 16, 16, seed=9)
    x = {n: t.float() for n, t in x.items()}
    seq = {n: t for n, t in x.items() if n != "initial_state"}
    kw = dict(delta=delta, normalize_qk=True)
    o_all, s_all = TC.chunk(**seq, initial_state=x["initial_state"], chunk_size=16, **kw)
    prefix = {n: t[:, :17] for n, t in seq.items()}
    o, s = TC.chunk(**prefix, initial_state=x["initial_state"], chunk_size=16, **kw)
    outs = [o]
    for t in range(17, 20):
        o_t, s = TS.step(state=s, **{n: v[:, t] for n, v in seq.items()}, **kw)
        outs.append(o_t[:, None])
    compare({"o": torch.cat(outs, 1), "state": s}, {"o": o_all, "state": s_all}, 1e-5)


# ---------------------------------------------------------------------------------------------------
# GPU: real head dims and lengths, fp32 and bf16, every gradient against the reference
# ---------------------------------------------------------------------------------------------------

GPU_TOL = {torch.float32: (2e-4, "max"), torch.bfloat16: (1e-2, "rms")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [64, 128, 256, 512])
@pytest.mark.parametrize("T", [1, 63, 64, 1000, 4096])
@pytest.mark.parametrize("algo", ALGORITHMS)
@pytest.mark.gpu
@needs_cuda
def test_gpu_chunk_matches_reference(algo, T, D, dtype):
    tol, metric = GPU_TOL[dtype]
    check(algo, 2, T, 2, D, D, 64, True, ALGORITHMS[algo][2], seed=T + D, tol=tol, dtype=dtype, metric=metric)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [64, 128, 256, 512])
@pytest.mark.parametrize("algo", ALGORITHMS)
@pytest.mark.gpu
@needs_cuda
def test_gpu_varlen(algo, D, dtype):
    lens = [0, 1, 700, 64, 0, 63, 1, 129]
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0)
    tol, metric = GPU_TOL[dtype]
    check(algo, 1, sum(lens), 2, D, D, 64, True, ALGORITHMS[algo][2], seed=D, cu_seqlens=cu, N=len(lens),
          tol=tol, dtype=dtype, metric=metric)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [64, 128, 256, 512])
@pytest.mark.parametrize("algo", ALGORITHMS)
@pytest.mark.gpu
@needs_cuda
def test_gpu_step(algo, D, dtype):
    delta = ALGORITHMS[algo][2]
    x, _ = make_inputs(algo, 8, 1, 4, D, D, seed=D)
    one = {n: (t[:, 0] if n != "initial_state" else t) for n, t in x.items()}
    kw = dict(g=one.get("g"), beta=one.get("beta"), delta=delta, normalize_qk=delta)
    qkv = {n: one[n].to(dtype) for n in ("q", "k", "v")}
    o_ref, s_ref = R.step(**{n: t.double() for n, t in qkv.items()}, state=one["initial_state"], **kw)
    o, s = TS.step(**qkv, state=one["initial_state"].float(),
                          **{n: (t.float() if torch.is_tensor(t) else t) for n, t in kw.items()})
    assert o.dtype == dtype and s.dtype == torch.float32
    tol, metric = GPU_TOL[dtype]
    compare({"o": o.double(), "state": s.double()}, {"o": o_ref, "state": s_ref}, tol, metric)
    # The same states as rows of a pool (in another order), updated in place.
    pool = torch.randn(12, *s.shape[1:], device=DEVICE)
    index = torch.randperm(12, device=DEVICE)[:8]
    pool[index] = one["initial_state"].float()
    o2, _ = TS.step(**qkv, state=pool, index=index,
                           **{n: (t.float() if torch.is_tensor(t) else t) for n, t in kw.items()})
    compare({"o": o2.double(), "state": pool[index].double()}, {"o": o_ref, "state": s_ref}, tol, metric)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [64, 128, 256, 512])
@pytest.mark.parametrize("algo", [a for a, (_, _, delta) in ALGORITHMS.items() if delta])
@pytest.mark.gpu
@needs_cuda
def test_gpu_negative_eigenvalues(algo, D, dtype):
    """beta in (0, 2) (model.negative_eigenvalues): the delta rule's eigenvalue 1 - beta along k turns
    negative; chunked core in packed segments and the decoding step against the reference."""
    lens = [0, 1, 700, 64, 0, 63, 1, 129]
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0)
    inputs, delta = make_inputs(algo, 1, sum(lens), 2, D, D, seed=D + 3, N=len(lens))
    inputs["beta"] = 2 * inputs["beta"]
    tol, metric = GPU_TOL[dtype]
    kw = dict(delta=delta, normalize_qk=True, chunk_size=64, cu_seqlens=cu)
    rounded = {n: (x.to(dtype).double() if n in ("q", "k", "v", "beta") else x) for n, x in inputs.items()}
    compare(run(TC.chunk, inputs, dtype, **kw), run(R.chunk, rounded, torch.float64, **kw), tol, metric)
    one = {n: (t[0, :8] if n != "initial_state" else t[:8]) for n, t in inputs.items()}
    step_kw = dict(g=one.get("g"), beta=one["beta"], delta=delta, normalize_qk=True)
    qkv = {n: one[n].to(dtype) for n in ("q", "k", "v")}
    o_ref, s_ref = R.step(**{n: t.double() for n, t in qkv.items()}, state=one["initial_state"], **step_kw)
    o, s = TS.step(**qkv, state=one["initial_state"].float(),
                   **{n: (t.float() if torch.is_tensor(t) else t) for n, t in step_kw.items()})
    compare({"o": o.double(), "state": s.double()}, {"o": o_ref, "state": s_ref}, tol, metric)
