"""Prefill + step decoding, and the lm-eval model: scores against the model's own cross-entropy, the
stopping rules of generation, batching, and real lm-eval runs on the recall fixtures."""
import json

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from mom_bench.checkpoint import CheckpointError, save_checkpoint
from mom_bench.config import EvalConfig, ModelConfig
from mom_bench.lm_eval_model import MomBenchLM
from mom_bench.models import MIXERS, build_model
from mom_bench.tokenizer import load_tokenizer

EOS = 256
TOK = load_tokenizer(None)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(mixer="mom", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(mixer=mixer, d_model=24, num_heads=2, embed_dropout=0.0, chunk_size=8), **kw})
    return cfg, build_model(cfg, TOK.vocab_size).double().eval()


def lm_of(model, **kw):
    return MomBenchLM(model=model, device="cpu", dtype="float64", **kw)


def reqs(kind, *args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


# --------------------------------------------------------------------------------------------- prefill
PREFILL_CASES = {name: dict(mixer=name) for name in MIXERS}
PREFILL_CASES["hybrid_mom_no_shared"] = dict(pattern=["mom", "attention"], n_layers=2, mlp="swiglu",
                                             shared_memory=False, topk=1, num_memories=3)


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_then_step_equals_forward(case):
    _, model = tiny(**PREFILL_CASES[case])
    ids = torch.randint(0, EOS, (3, 13))
    full, _ = model(ids)
    for split in (1, 6):  # a prompt of one token, and one spanning several MoM routing decisions
        logits, state = model.prefill(ids[:, :split])
        out = [logits]
        for t in range(split, ids.shape[1]):
            step_logits, state = model.step(ids[:, t], state)
            out.append(step_logits[:, None])
        torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------ likelihood
def reference_logprob(model, context, continuation):
    """Sum of log p(continuation | context) from one plain forward pass."""
    tokens = torch.tensor([context + continuation])
    logits, _ = model(tokens[:, :-1])
    lp = F.log_softmax(logits[0, -len(continuation):], -1)
    return lp.gather(-1, torch.tensor(continuation)[:, None]).sum().item()


def test_loglikelihood_equals_the_models_cross_entropy():
    _, model = tiny("mom")
    pairs = [("hello", " world"), ("a much longer context, to pad the others", " and more"), ("", "xyz"),
             ("ab", "c")]
    batched = lm_of(model, batch_size=3).loglikelihood(reqs("loglikelihood", *pairs), disable_tqdm=True)
    single = lm_of(model, batch_size=1).loglikelihood(reqs("loglikelihood", *pairs), disable_tqdm=True)
    for (ctx, cont), (lp, _), (lp1, _) in zip(pairs, batched, single):
        context = TOK.encode(ctx) or [EOS]  # an empty context is the EOS token
        assert lp == pytest.approx(reference_logprob(model, context, TOK.encode(cont)), abs=1e-9)
        assert lp == pytest.approx(lp1, abs=1e-9)  # right padding in a batch changes nothing

    lm = lm_of(model)
    ctx = TOK.encode("context")
    best = int(model(torch.tensor([ctx]))[0][0, -1].argmax())
    (_, greedy), (_, not_greedy) = lm._loglikelihood_tokens([(None, ctx, [best]), (None, ctx, [(best + 1) % EOS])])
    assert greedy and not not_greedy

    # Longer than max_length: the last max_length + 1 tokens are scored (left truncation).
    short = lm_of(model, max_length=6)
    (lp, _), = short.loglikelihood(reqs("loglikelihood", ("hello world", "!!")), disable_tqdm=True)
    tokens = TOK.encode("hello world!!")[-7:]
    assert lp == pytest.approx(reference_logprob(model, tokens[:5], tokens[5:]), abs=1e-9)


def test_loglikelihood_rolling_sums_the_full_text_loss():
    _, model = tiny("gated_deltanet")
    text = "recurrent memories remember"  # 27 bytes
    tokens = TOK.encode(text)
    (total,) = lm_of(model, max_length=64).loglikelihood_rolling(reqs("loglikelihood_rolling", (text,)))
    logits, _ = model(torch.tensor([[EOS] + tokens[:-1]]))
    full = -F.cross_entropy(logits[0], torch.tensor(tokens), reduction="sum").item()
    assert total == pytest.approx(full, abs=1e-9)

    # Windows of 9 tokens over 27: each window starts fresh from the token before it (EOS first).
    (windowed,) = lm_of(model, max_length=9).loglikelihood_rolling(reqs("loglikelihood_rolling", (text,)))
    expected = sum(reference_logprob(model, [([EOS] + tokens)[k]], tokens[k:k + 9]) for k in (0, 9, 18))
    assert windowed == pytest.approx(expected, abs=1e-9)
    assert windowed != pytest.approx(full, abs=1e-6)


# ---------------------------------------------------------------------------------------------- generation
class Successor(torch.nn.Module):
    """A scripted model: the next byte is the last byte + 1; after "z" comes EOS, after EOS "a"."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(257, 1)

    def _logits(self, ids):
        nxt = torch.where(ids == ord("z"), EOS, torch.where(ids == EOS, ord("a"), ids + 1))
        return F.one_hot(nxt, 257).double()

    def forward(self, ids):
        return self._logits(ids), torch.zeros(())

    def prefill(self, ids):
        return self._logits(ids), {"last": ids[:, -1]}

    def step(self, token, state):
        return self._logits(token), {"last": token}


def generate(lm, *requests):
    return lm.generate_until(reqs("generate_until", *requests), disable_tqdm=True)


GEN_CASES = [  # (prompt, gen_kwargs, expected)
    ("a", {"max_gen_toks": 5}, "bcdef"),                          # max_gen_toks
    ("a", {"until": ["de"], "max_gen_toks": 20}, "bc"),           # a stop string spanning two tokens
    ("b", {"until": "e", "max_gen_toks": 20}, "cd"),              # until given as a string
    ("w", {"until": ["\n"], "max_gen_toks": 20}, "xyz"),          # EOS stops, and is not in the text
    ("", {"until": ["c", "b"], "max_gen_toks": 20}, "a"),         # empty prompt = EOS; the first stop wins
    ("the prompt ends in k", {"until": ["o"], "max_gen_toks": 3}, "lmn"),
]


def test_generate_until_stopping_rules_one_by_one_and_batched():
    lm = lm_of(Successor(), batch_size=1)
    requests = [(prompt, kw) for prompt, kw, _ in GEN_CASES]
    expected = [want for _, _, want in GEN_CASES]
    assert generate(lm, *requests) == expected
    lm.batch_size = 4  # mixed prompt lengths and rules in one batch
    assert generate(lm, *requests) == expected
    lm.max_gen_toks = 2  # the model default when a task sets no max_gen_toks
    assert generate(lm, ("a", {"until": ["\n"]})) == ["bc"]


def test_generate_until_keeps_the_last_max_length_minus_max_gen_toks_prompt_tokens():
    """As lm-eval's Hugging Face backend and the JRT reference model: room is left for the answer."""
    lm = lm_of(Successor(), max_length=8, max_gen_toks=3)
    seen = []
    lm.greedy = lambda prompts, until, max_new: seen.extend(prompts) or [""] * len(prompts)
    generate(lm, ("0123456789", {"max_gen_toks": 2}), ("0123456789", {}), ("ab", {"max_gen_toks": 5}))
    assert sorted(seen) == sorted([TOK.encode("456789"), TOK.encode("56789"), TOK.encode("ab")])  # 8-2, 8-3
    with pytest.raises(ValueError, match="max_gen_toks \\(8\\) must be less than max_length \\(8\\)"):
        generate(lm, ("ab", {"max_gen_toks": 8}))


@pytest.mark.parametrize("mixer", ["mom", "attention", "gated_deltanet"])
def test_batched_decoding_with_state_equals_full_recomputation(mixer):
    _, model = tiny(mixer, seed=1)
    with torch.no_grad():
        model.embed.weight.mul_(50)  # larger logits: greedy outputs that vary with the context
    prompts = [TOK.encode(p) for p in ("key 7 value", "a", "the longest prompt of all here", "mid size")]
    rules = [[] for _ in prompts]
    lm = lm_of(model, batch_size=4)
    batched, _ = lm.greedy_tokens(prompts, rules, [12] * 4)
    one_by_one = [lm.greedy_tokens([p], [[]], [12])[0][0] for p in prompts]
    assert batched == one_by_one
    for prompt, got in zip(prompts, batched):  # recompute the whole sequence for every new token
        seq = list(prompt)
        want = []
        while len(want) < 12:
            token = int(model(torch.tensor([seq]))[0][0, -1].argmax())
            if token == EOS:
                break
            want.append(token)
            seq.append(token)
        assert got == want
    assert len({tuple(g) for g in batched}) > 1, "outputs should depend on the prompt"


# ------------------------------------------------------------------------------------ lm-eval end to end
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg, model = tiny("gated_deltanet", d_model=16)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, model.float(), cfg, vocab_size=TOK.vocab_size, tokenizer=TOK.name)
    return path


def test_registered_for_lm_eval_next_to_its_own_models():
    from lm_eval.api.registry import get_model, model_registry

    assert get_model("mom_bench") is MomBenchLM
    assert "hf" in model_registry  # registering ours first must not hide lm-eval's own (lazy) models
    from importlib.metadata import EntryPoint

    # the console script of pyproject.toml resolves to lm-eval's CLI wrapper
    assert EntryPoint("mom-bench-lm-eval", "mom_bench.lm_eval_model:cli", "console_scripts").load().__name__ == "cli"


def test_simple_evaluate_by_name_on_the_recall_fixtures(checkpoint):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mom_bench.tasks.recall import FIXTURE_DIR, TASK_DIR

    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False,
                     metadata={"recall_data": str(FIXTURE_DIR), "tokenizer": "bytes", "context_length": 200})
    out = lm_eval.simple_evaluate(model="mom_bench", model_args={"checkpoint": str(checkpoint), "max_length": 256},
                                  tasks=["jrt_recall"], task_manager=tm, limit=1, bootstrap_iters=0)
    lm = MomBenchLM(checkpoint=str(checkpoint), device="cpu", max_length=256)
    for task in ["jrt_fda", "jrt_swde", "jrt_squad", "jrt_fda_twice", "jrt_swde_twice", "jrt_squad_twice"]:
        assert 0.0 <= out["results"][task]["contains,none"] <= 1.0
        for sample in out["samples"][task]:  # what lm-eval got is what the model generates
            prompt, kwargs = sample["arguments"][0]
            assert kwargs["until"] == ["\n"] and kwargs["max_gen_toks"] == 48
            assert sample["resps"][0][0] == generate(lm, (prompt, kwargs))[0]
            assert "\n" not in sample["resps"][0][0] and len(sample["resps"][0][0]) <= 48  # one char per byte at most


def test_eval_command_writes_a_record_the_report_draws(checkpoint, tmp_path):
    from mom_bench import report
    from mom_bench.evaluate import evaluate
    from mom_bench.tasks.recall import FIXTURE_DIR

    cfg = EvalConfig(checkpoint=str(checkpoint), tasks=["jrt_squad"], include_defaults=False, limit=2,
                     metadata={"recall_data": str(FIXTURE_DIR), "context_length": 200}, max_length=256,
                     results_dir=str(tmp_path), device="cpu")
    record = evaluate(cfg)
    path = tmp_path / "runs" / f"{record['run_id']}.json"
    assert json.loads(path.read_text())["scores"] == record["scores"]
    assert record["kind"] == "eval" and record["status"] == "complete"
    assert set(record["scores"]) == {"jrt_squad"} and 0 <= record["scores"]["jrt_squad"] <= 1
    assert record["metadata"]["tokenizer"] == "bytes"  # the checkpoint's tokenizer reaches the task window
    scores = report.load(tmp_path).scores
    assert scores[["model", "d_model", "task"]].values.tolist() == [["gated_deltanet", 16, "jrt_squad"]]

    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate(EvalConfig(checkpoint=str(tmp_path / "nope"), results_dir=str(tmp_path)))


def test_cuda_graph_model_arg_from_the_command_line():
    """lm-eval passes model_args as strings: cuda_graph=false must switch the graph decoder off."""
    _, model = tiny("mom")
    assert lm_of(model, cuda_graph="false").cuda_graph is False
    assert lm_of(model, cuda_graph="True").cuda_graph is True
    with pytest.raises(ValueError, match="cuda_graph"):
        lm_of(model, cuda_graph="maybe")
