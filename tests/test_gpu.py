"""The same model on a GPU: runs under bf16 autocast, and agrees with itself on the CPU in fp32."""
import pytest
import torch

from mom_bench.models import ModelConfig
from mom_bench.models import MIXERS, build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("mixer", MIXERS)
def test_cuda_matches_cpu_and_trains_under_bf16(mixer):
    torch.manual_seed(0)
    model = build_model(ModelConfig(mixer=mixer, d_model=64, num_heads=2, embed_dropout=0.0), 100)
    ids = torch.randint(0, 100, (4, 130))
    ref, _ = model(ids)
    gpu = model.cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    out, _ = gpu(ids.cuda())
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, aux = gpu(ids.cuda())
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.cuda().flatten()) + aux
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)


@pytest.mark.parametrize("mixer", MIXERS)
def test_cuda_decoding_with_step_kernel_reproduces_forward(mixer):
    """On CUDA `auto` runs the chunk kernels in forward and the step kernel in decoding: same function."""
    from mom_bench import kernels

    assert kernels.get_backend() == "auto"
    torch.manual_seed(1)
    cfg = ModelConfig(mixer=mixer, d_model=128, num_heads=2, embed_dropout=0.0, num_memories=4, topk=2)
    model = build_model(cfg, 100).cuda().eval()
    ids = torch.randint(0, 100, (3, 70), device="cuda")
    logits, _ = model(ids)
    state, stepped = model.init_state(3), []
    for t in range(ids.shape[1]):
        out, state = model.step(ids[:, t], state)
        stepped.append(out)
    torch.testing.assert_close(torch.stack(stepped, 1), logits, rtol=2e-3, atol=2e-3)
    # prefill (the chunk kernel's final states, the convolution tails) then steps: the same function
    with torch.no_grad():
        prefix, state = model.prefill(ids[:, :45])
    stepped = []
    for t in range(45, ids.shape[1]):
        out, state = model.step(ids[:, t], state)
        stepped.append(out)
    torch.testing.assert_close(prefix, logits[:, :45], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(torch.stack(stepped, 1), logits[:, 45:], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("grouped", [False, True])
def test_mom_layer_captured_as_cuda_graph_matches_eager(grouped, monkeypatch):
    """The MoM layer makes no host sync, so its forward and backward can be captured as CUDA graphs
    (torch.cuda.make_graphed_callables: what takes a launch-bound size off the CPU). Replays give eager's
    output and every gradient. With `grouped`, eager runs its backward in groups, planned on the host;
    a captured call cannot wait for the host and runs as one group."""
    from mom_bench.kernels.triton import chunk as TC
    from mom_bench.models import MemoryMixer

    if grouped:
        monkeypatch.setattr(TC, "WORKSPACE_BYTES", 1)
        monkeypatch.setattr(TC, "MIN_CHAINS", 1)
    torch.manual_seed(0)
    # bf16: in fp32 torch's grouped product falls back to a loop that copies the group offsets to the host
    m = MemoryMixer(128, 2, 64, kind="gated_delta", num_memories=4, topk=2, shared_memory=True)
    m = m.cuda().bfloat16()
    x = torch.randn(4, 200, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(4, 200, 128, device="cuda", dtype=torch.bfloat16)

    def run(f):
        for t in [x, *m.parameters()]:
            t.grad = None
        y = f(x)[0]
        y.backward(gy)
        return [y.detach().clone()] + [t.grad.clone() for t in [x, *m.parameters()]]

    eager = run(m)
    graphed = torch.cuda.make_graphed_callables(m, (x,))
    for _ in range(2):  # the second replay starts from the first's buffers
        got = run(graphed)
        for e, g in zip(eager, got):
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("mixer", ["mom", "gated_deltanet"])
def test_graphed_decoder_replays_eager_steps(mixer):
    """A CUDA-graph decoder from a prefilled state gives the eager steps' logits, and advances the state."""
    from mom_bench.models import GraphedDecoder

    torch.manual_seed(2)
    cfg = ModelConfig(mixer=mixer, d_model=128, num_heads=2, embed_dropout=0.0, num_memories=4, topk=2,
                      mlp="swiglu")
    model = build_model(cfg, 100).cuda().eval()
    ids = torch.randint(0, 100, (3, 40), device="cuda")
    _, state = model.prefill(ids[:, :30])
    eager_state = [{k: v.clone() for k, v in s.items()} for s in state]
    decoder = GraphedDecoder(model, state)
    for t in range(30, 40):
        want, eager_state = model.step(ids[:, t], eager_state)
        got = decoder.step(ids[:, t]).clone()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for s, e in zip(decoder.state, eager_state):
        for k in s:
            torch.testing.assert_close(s[k], e[k], rtol=1e-5, atol=1e-5)


def test_lm_eval_generation_with_cuda_graph_equals_eager():
    """lm-eval's greedy generation replays the step from a CUDA graph (its batch fixed: finished rows stay,
    fed EOS) and gives the eager path's tokens, whose finished rows leave the batch."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (GPU hosts need it carried as wheels)")
    from mom_bench.lm_eval_model import MomBenchLM
    from mom_bench.models import GraphedDecoder
    from mom_bench.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    torch.manual_seed(3)
    cfg = ModelConfig(mixer="mom", d_model=64, num_heads=2, embed_dropout=0.0, num_memories=4, topk=2)
    model = build_model(cfg, tok.vocab_size)
    with torch.no_grad():
        model.embed.weight.mul_(30)  # larger logits: outputs that vary with the prompt
    prompts = [tok.encode(p) for p in ("key 7 value", "a", "the longest prompt of all here", "mid size")]
    out = {}
    for graph in (False, True):
        lm = MomBenchLM(model=model, tokenizer=tok, device="cuda", dtype="float32", batch_size=4, cuda_graph=graph)
        assert GraphedDecoder.supports(lm.model)
        out[graph] = lm.greedy_tokens(prompts, [[], ["e"], [], []], [12, 12, 5, 9])
    assert out[True] == out[False]
    assert len({tuple(t) for t in out[True][0]}) > 1, "outputs should depend on the prompt"


@pytest.mark.parametrize("mixer", MIXERS)
def test_graphed_training_follows_eager_training(mixer, tmp_path):
    """The train and evaluation steps replayed from CUDA graphs give eager's loss curve and accuracy (both
    use the same capturable optimizer; eager CUDA training is deterministic here, so they agree to the last
    digits); with dropout on, the graphed run trains too."""
    from mom_bench.config import DataConfig, OptimConfig, RunConfig, SliceConfig
    from mom_bench.train import train

    def run(graph, dropout=0.0):
        data = DataConfig(vocab_size=256, batch_size=64, test_batch_size=100,
                          train=[SliceConfig(64, 4, 64 * 150 + 17), SliceConfig(32, 2, 64 * 50)],
                          test=[SliceConfig(64, 4, 300), SliceConfig(32, 2, 300)])
        model = ModelConfig(mixer=mixer, d_model=64, num_heads=2, embed_dropout=dropout)
        cfg = RunConfig(model=model, data=data, optim=OptimConfig(lr=3e-3, epochs=2, early_stop=1.0),
                        device="cuda",
                        results_dir=str(tmp_path / f"{graph}{dropout}"), progress=False, cuda_graph=graph)
        return train(cfg)

    eager, graphed = run(False), run(True)
    assert eager["status"] == graphed["status"] == "complete", (eager["reason"], graphed["reason"])
    assert eager["cuda_graphs"] == {"train": 0, "evaluation": 0}
    # a graph per shape called more than 3 times: the full batches of both train slices (the last batch
    # of 17 comes twice and runs eagerly) and the two test slices' batches of 100
    assert graphed["cuda_graphs"] == {"train": 2, "evaluation": 2}
    a, b = (torch.tensor([loss for _, loss in r["loss_curve"]]) for r in (eager, graphed))
    assert len(a) == len(b) > 100
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert eager["mean_accuracy"] == graphed["mean_accuracy"]
    assert run(True, dropout=0.1)["status"] == "complete"
