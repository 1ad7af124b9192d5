"""The benchmark's cases: what is timed against what, and the inputs. flash-linear-attention is imported
here, lazily, inside its contenders, and nowhere in the models."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch

Fn = Callable[[], object]
SUITES = ("kernel", "layer", "decode", "generate", "train", "sweep")  # sweep: see throughput.py


@dataclass
class Contender:
    name: str
    build: Callable[[], Dict[str, Fn]]  # pass name ("fwd", "fwd+bwd", "step") -> a closure to time
    memory: bool = True  # False: its peak is not measurable per call (a CUDA graph allocates at capture)


@dataclass
class Case:
    suite: str
    name: str
    batch_size: int
    seq_len: int
    contenders: List[Contender]
    reference: str  # the contender every ratio divides by
    target: str = ""
    memory: bool = False  # also measure peak memory of the forward+backward
    rows: List[dict] = field(default_factory=list)


# --- timing --------------------------------------------------------------------------------------------

def passes(forward: Callable[[], torch.Tensor], params: List[torch.Tensor]) -> Dict[str, Fn]:
    """fwd under no_grad (inference cost) and fwd+bwd with a fixed upstream gradient, grads cleared."""
    out = forward()
    grad = torch.randn_like(out)

    def fwd():
        with torch.no_grad():
            forward()

    def fwd_bwd():
        for p in params:
            p.grad = None
        forward().backward(grad)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# --- contenders ----------------------------------------------------------------------------------------
def _fla(module: str):
    """Import a flash-linear-attention module; switch its Hopper guard off (timing only, see above)."""
    import importlib

    try:
        import fla.ops.common.chunk_o as chunk_o

        chunk_o.TRITON_ABOVE_3_7_1 = True
    except (ImportError, AttributeError):
        pass
    return importlib.import_module(module)


def gdn_inputs(B, T, H, K, dtype, grad=True):
    q, k, v = (torch.randn(B, T, H, K, device="cuda", dtype=dtype, requires_grad=grad) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device="cuda")).requires_grad_(grad)
    beta = torch.rand(B, T, H, device="cuda", dtype=dtype).requires_grad_(grad)
    return q, k, v, g, beta


def kernel_case(B, T, H, K, dtype) -> Case:
    def ours():
        from mom_bench.kernels.triton.chunk import chunk

        x = gdn_inputs(B, T, H, K, dtype)
        return passes(lambda: chunk(x[0], x[1], x[2], g=x[3], beta=x[4], delta=True,
                                           normalize_qk=True)[0], list(x))

    def fla():
        f = _fla("fla.ops.gated_delta_rule").chunk_gated_delta_rule
        x = gdn_inputs(B, T, H, K, dtype)
        return passes(lambda: f(*x, use_qk_l2norm_in_kernel=True)[0], list(x))

    return Case("kernel", f"gated delta rule H{H} K=V={K}", B, T,
                [Contender("ours", ours), Contender("fla chunk_gated_delta_rule", fla)],
                reference="fla chunk_gated_delta_rule", target="<= 1.0x" if K == 256 else "")


def _module_passes(module: torch.nn.Module, B, T, D, dtype, graph=False) -> Dict[str, Fn]:
    module = module.to(device="cuda", dtype=dtype)
    x = torch.randn(B, T, D, device="cuda", dtype=dtype, requires_grad=True)
    params = [x] + list(module.parameters())
    if graph:  # forward and backward each replayed from a CUDA graph, captured once for this input
        module = torch.cuda.make_graphed_callables(module, (x,))
    return passes(lambda: _first(module(x)), params)


def layer_case(B, T, D, H, head_dim, dtype, target, graph=False) -> Case:
    """The layers at one shape; with `graph`, also ours captured as CUDA graphs (its forward and backward
    make no host sync), for the sizes where launching, not the GPU, sets the time."""
    from mom_bench.models import Attention, MemoryMixer

    mom = dict(num_memories=4, topk=2, shared_memory=True)
    attn_heads = max(D // 128, 1)
    ours_mom = lambda: MemoryMixer(D, H, head_dim, kind="gated_delta", **mom)
    contenders = [
        Contender("ours MoM", lambda: _module_passes(ours_mom(), B, T, D, dtype)),
        *([Contender("ours MoM (CUDA graph)", lambda: _module_passes(ours_mom(), B, T, D, dtype, graph=True),
                     memory=False)] if graph else []),
        Contender("fla MomAttention", lambda: _module_passes(_fla("fla.layers").MomAttention(
            hidden_size=D, head_dim=head_dim, num_heads=H, expand_v=1, num_memories=4, topk=2,
            shared_mem=True), B, T, D, dtype)),
        Contender("ours Gated DeltaNet", lambda: _module_passes(
            MemoryMixer(D, H, head_dim, kind="gated_delta", num_memories=0), B, T, D, dtype)),
        Contender("fla GatedDeltaNet", lambda: _module_passes(_fla("fla.layers").GatedDeltaNet(
            hidden_size=D, head_dim=head_dim, num_heads=H, expand_v=1), B, T, D, dtype)),
        Contender(f"SDPA attention ({attn_heads} heads)", lambda: _module_passes(
            Attention(D, attn_heads), B, T, D, dtype)),
    ]
    return Case("layer", f"hidden {D}, {H}x{head_dim} heads", B, T, contenders, reference="fla MomAttention",
                target=target, memory=True)


def decode_case(contexts, dtype) -> Case:
    """The core of one decoding step: MoM's state update against SDPA over a KV cache (no projections)."""
    B, H, K, M, active = 8, 4, 256, 5, 3  # 4 routed memories + shared; top-2 + shared updated per token

    def ours():
        from mom_bench import kernels

        S = torch.zeros(B, M, H, K, K, device="cuda")
        idx = torch.stack([torch.randperm(M - 1, device="cuda")[:2] for _ in range(B)])
        idx = torch.cat([idx, torch.full((B, 1), M - 1, device="cuda")], 1)  # (B, 3) memories to update
        q, k, v = (torch.randn(B * active, H, K, device="cuda", dtype=dtype) for _ in range(3))
        g = -torch.rand(B * active, H, device="cuda")
        beta = torch.rand(B * active, H, device="cuda", dtype=dtype)
        flat = (torch.arange(B, device="cuda")[:, None] * M + idx).flatten()

        def step():  # as MemoryMixer.step: the selected memories updated in place in the pool
            return kernels.step(q, k, v, S.view(B * M, H, K, K), g=g, beta=beta, delta=True, normalize_qk=True,
                               index=flat)[0]

        return {"step": step}

    def sdpa(n):
        def build():
            qh = torch.randn(B, 8, 1, 128, device="cuda", dtype=dtype)
            kv = [torch.randn(B, 8, n, 128, device="cuda", dtype=dtype) for _ in range(2)]
            return {"step": lambda: torch.nn.functional.scaled_dot_product_attention(qh, *kv)}
        return build

    contenders = [Contender("ours MoM step (3 of 5 memories)", ours)]
    contenders += [Contender(f"SDPA KV cache {n // 1024}K", sdpa(n)) for n in contexts]
    ref = f"SDPA KV cache {8 if 8192 in contexts else contexts[0] // 1024}K"
    return Case("decode", "one token, B8, 4x256 state vs 8x128 KV", B, 1, contenders, reference=ref,
                target="<= 1.0x")


def generate_case(contexts, dtype) -> Case:
    """Per-token decoding latency of whole LMs with a context of n tokens already in their state."""
    from mom_bench.models import ModelConfig, build_model

    B, D, layers, vocab = 8, 1024, 4, 32000

    def lm(mixer, n, graph=False):
        def build():
            heads, hd = (4, 256) if mixer == "mom" else (8, 128)
            cfg = ModelConfig(mixer=mixer, d_model=D, n_layers=layers, num_heads=heads, head_dim=hd,
                              mlp="swiglu", mlp_ratio=2.0, embed_dropout=0.0)
            model = build_model(cfg, vocab).to(device="cuda", dtype=dtype).eval()
            state = model.init_state(B, "cuda", dtype)
            if mixer == "attention":  # a KV cache holding n tokens, with room for more (values don't matter)
                state = [dict(k=torch.randn(B, heads, n + 64, hd, device="cuda", dtype=dtype),
                              v=torch.randn(B, heads, n + 64, hd, device="cuda", dtype=dtype), len=n)
                         for _ in state]
            # Timing repeats the step from the same state: attention's stays at n tokens (its step writes a
            # slot past `len` and returns a new dict); MoM's memories are updated in place, same cost.
            token = torch.randint(0, vocab, (B,), device="cuda")
            if graph:  # the same step replayed from a CUDA graph (fixed-size state only: not attention)
                from mom_bench.models import GraphedDecoder

                decoder = GraphedDecoder(model, state)
                return {"step": lambda: decoder.step(token)}
            return {"step": lambda: model.step(token, state)}
        return build

    kinds = (("mom", "ours MoM", False), ("mom", "ours MoM (CUDA graph)", True), ("attention", "SDPA attention", False))
    contenders = [Contender(f"{name} LM, context {n // 1024}K", lm(mixer, n, graph))
                  for n in contexts for mixer, name, graph in kinds]
    ref = f"SDPA attention LM, context {8 if 8192 in contexts else contexts[0] // 1024}K"
    return Case("generate", f"{layers} layers, hidden {D}, B{B}, one token", B, 1, contenders, reference=ref,
                target="flat; faster from 8K")


class _FlaMixer(torch.nn.Module):
    """A flash-linear-attention layer under the mixers' contract: forward(x) -> (y, aux)."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)[0], None


FLA_LAYERS = {  # fla 0.6.0 layers at the shape of ours: q/k/v at the model width, one gate per head
    "LinearAttention": lambda D, H: dict(hidden_size=D, num_heads=H, expand_k=1.0, expand_v=1.0),
    "GatedLinearAttention": lambda D, H: dict(hidden_size=D, num_heads=H, expand_k=1.0, expand_v=1.0),
    "DeltaNet": lambda D, H: dict(hidden_size=D, num_heads=H, expand_k=1.0, expand_v=1.0),
    "GatedDeltaNet": lambda D, H: dict(hidden_size=D, num_heads=H, head_dim=D // H, expand_v=1),
    "MomAttention": lambda D, H: dict(hidden_size=D, num_heads=H, head_dim=D // H, expand_v=1,
                                      num_memories=4, topk=2, shared_mem=True),
    "Mamba2": lambda D, H: dict(hidden_size=D, num_heads=H, head_dim=D // H, expand=1),
}


def train_case(B, T, D, H, n, target, vocab=8192, layers=2) -> Case:
    """One MQAR optimizer step of every mixer's 2-layer LM as `mom_bench.train` runs it (bf16 autocast,
    the head at n query positions, clipping, AdamW), eager and replayed from CUDA graphs, against LMs of
    the same shape whose mixers are flash-linear-attention layers, trained by the same step."""
    from mom_bench.config import OptimConfig
    from mom_bench.models import MIXERS, LanguageModel, ModelConfig, build_model
    from mom_bench.train import optimizer, train_step

    def step(build, graph):
        def make():
            torch.manual_seed(0)
            model = build().cuda()
            x = torch.randint(0, vocab, (B, T), device="cuda")
            positions = torch.rand(B, T, device="cuda").argsort(1)[:, :n]
            y = torch.randint(0, vocab, (B, n), device="cuda")
            fn = train_step(model, optimizer(model, OptimConfig(), capturable=True), 1.0, torch.device("cuda"),
                            graph, "bench")
            return {"train step": lambda: fn(x, positions, y)}
        return make

    def ours(mixer):
        return lambda: build_model(ModelConfig(mixer=mixer, d_model=D, n_layers=layers, num_heads=H,
                                               embed_dropout=0.0), vocab)

    def fla(name):
        def build():
            layer = getattr(_fla("fla.layers"), name)
            return LanguageModel(vocab, D, [_FlaMixer(layer(**FLA_LAYERS[name](D, H))) for _ in range(layers)])
        return build

    mixers = [m for m in MIXERS if m != "mom_attention"]
    contenders = [Contender(f"ours {m}{' (CUDA graph)' * g}", step(ours(m), g), memory=not g)
                  for m in mixers for g in (False, True)]
    contenders += [Contender(f"fla {name}", step(fla(name), False)) for name in FLA_LAYERS]
    return Case("train", f"MQAR train step, d_model {D}, {H} head{'s' * (H > 1)}, n {n}", B, T, contenders,
                reference="fla GatedDeltaNet", target=target)


def build_cases(suites, dtype, quick: bool) -> List[Case]:
    contexts = [1024, 8192] if quick else [1024, 8192, 32768]
    cases = []
    if "kernel" in suites:
        cases += [kernel_case(8, 2048, 4, 256, dtype), kernel_case(8, 2048, 16, 64, dtype)]
    if "layer" in suites:
        cases.append(layer_case(8, 2048, 1024, 4, 256, dtype, "<= 0.4x, memory <= 1.0x"))
        if not quick:
            cases.append(layer_case(1, 16384, 1024, 4, 256, dtype, "<= 0.4x"))
        cases.append(layer_case(128, 512, 128, 2, 64, dtype, "<= 0.25x", graph=True))
    if "decode" in suites:
        cases.append(decode_case(contexts, dtype))
    if "generate" in suites:
        cases.append(generate_case(contexts, dtype))
    if "train" in suites:  # the sizes of the Zoology grid's cells (vocabulary 8192, 2 layers, no MLP)
        cases += [train_case(512, 64, 64, 1, 4, "<= 2.5 ms and <= 0.2x"),
                  train_case(128, 512, 128, 1, 64, "<= 6 ms and <= 0.4x"),
                  train_case(128, 512, 512, 2, 64, "Gated DeltaNet <= 15 ms, MoM <= 30 ms"),
                  train_case(128, 512, 512, 1, 64, "runs: zoology_fig2's widest cells, one head of 512")]
    return cases


# --- running and reporting ---------------------------------------------------------------------------
