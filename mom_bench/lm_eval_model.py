"""mom_bench checkpoints as an lm-eval model: ``--model mom_bench --model_args checkpoint=DIR``.

lm-eval 0.4 finds models only in its registry, with no plugin discovery, so this module registers
`MomBenchLM` as "mom_bench" when it is imported. Three ways to use it:

    mom-bench-lm-eval --model mom_bench --model_args checkpoint=DIR --tasks jrt_recall \
        --include_path "$(python -c 'import mom_bench.tasks.recall as r; print(r.TASK_DIR)')"
    python -m mom_bench.lm_eval_model ...          (the same: lm-eval's CLI after the registration)

    import mom_bench.lm_eval_model                 # registers "mom_bench"
    lm_eval.simple_evaluate(model="mom_bench", model_args={"checkpoint": DIR}, tasks=[...])
    lm_eval.simple_evaluate(model=MomBenchLM(checkpoint=DIR), tasks=[...])

model_args: `checkpoint` (a checkpoint folder, or a pretraining out_dir: its latest checkpoint),
`device` (auto | cpu | cuda | cuda:N), `batch_size`, `dtype` (auto: bf16 autocast on CUDA as in
training, fp32 on the CPU | float32 | bfloat16 | float16 | float64), `max_length` (default 2048),
`max_gen_toks` (default 256, for tasks that set none), `tokenizer` (optional: must name the checkpoint's
own tokenizer; it is there so that lm-eval passes it on to the tasks' metadata, which the recall tasks
use to measure their window), `cuda_graph` (default true: on CUDA, a model whose every layer is a memory
mixer decodes with a CUDA-graph replay of its step, `GraphedDecoder`).

Behaviour:
- loglikelihood: (context + continuation) keeps its last max_length + 1 tokens (left truncation), one
  parallel forward per batch of requests sorted by length.
- loglikelihood_rolling: lm-eval's disjoint rolling windows of max_length tokens, each scored from a
  fresh state (EOS first), summed per document.
- generate_until: greedy. A prompt keeps its last max_length - max_gen_toks tokens (left truncation that
  leaves room for the answer, with the request's max_gen_toks, as lm-eval's Hugging Face backend and the
  JRT reference's model do); an empty prompt is the EOS token. A batch prefills the length its prompts
  share with one parallel pass, reads the rest of each prompt step by step, then decodes each sequence
  with the mixers' recurrent state (constant memory per token for the linear mixers; a KV cache for
  attention). A sequence stops at EOS, after max_gen_toks tokens, or once its decoded continuation
  contains one of the `until` strings; the output is cut before the first stop string. Finished
  sequences leave the batch (with a CUDA-graph decoder, whose batch is fixed, they stay in it, fed EOS,
  and their outputs are not read).
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import lm_eval.models  # noqa: F401 -- registers lm-eval's own models first (the registry fills lazily only when empty)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, handle_arg_string, make_disjoint_window

from mom_bench import runtime
from mom_bench.models import generate

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DEFAULT_MAX_LENGTH = 2048  # the JRT / MoM recall protocol's context length
DEFAULT_BATCH_SIZE = 16


@register_model("mom_bench")
class MomBenchLM(TemplateLM):
    def __init__(self, checkpoint: Optional[str] = None, device: Optional[str] = "auto",
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE, dtype: str = "auto",
                 max_length: Optional[int] = None, max_gen_toks: int = 256, tokenizer: Optional[str] = None,
                 model: Optional[torch.nn.Module] = None, max_batch_size: Optional[int] = None,
                 cuda_graph: bool | str = True, **kwargs: Any):
        """Either `checkpoint` (a folder) or `model` with `tokenizer` (a tokenizer object or name)."""
        super().__init__()
        from mom_bench.tokenizer import load_tokenizer

        if kwargs:
            log.warning("mom_bench: ignoring unknown model_args %s", sorted(kwargs))
        self._device = runtime.device(device)
        if model is None:
            if not checkpoint:
                raise ValueError("mom_bench model needs model_args checkpoint=<checkpoint folder>")
            from mom_bench.checkpoint import load_checkpoint

            loaded = load_checkpoint(checkpoint, device=self._device)
            if tokenizer is not None and _name(tokenizer) != (loaded.tokenizer or "bytes"):
                raise ValueError(f"tokenizer={_name(tokenizer)!r} but checkpoint {loaded.path} was trained with "
                                 f"{loaded.tokenizer!r}")
            model, tokenizer = loaded.model, loaded.tokenizer
            self.checkpoint_path = str(loaded.path)
        else:
            model, self.checkpoint_path = model.to(self._device), None
        self.tok = load_tokenizer(tokenizer) if tokenizer is None or isinstance(tokenizer, str) else tokenizer
        if model.embed.num_embeddings < self.tok.vocab_size:
            raise ValueError(f"tokenizer {self.tok.name!r} has {self.tok.vocab_size} ids but the model only "
                             f"{model.embed.num_embeddings}")
        self.dtype, self.autocast_dtype = _dtypes(dtype, self._device)
        self.model = model.to(self.dtype).eval()
        self.batch_size = _batch_size(batch_size)
        self.max_length = int(max_length or DEFAULT_MAX_LENGTH)
        self.max_gen_toks = int(max_gen_toks)
        # lm-eval's own parser turns "false" into False (model_args strings come through it; this takes
        # a string passed directly the same way)
        self.cuda_graph = handle_arg_string(cuda_graph) if isinstance(cuda_graph, str) else cuda_graph
        if not isinstance(self.cuda_graph, bool):
            raise ValueError(f"cuda_graph must be true or false, got {cuda_graph!r}")

    # --- TemplateLM's tokenization interface ------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(list(tokens))

    def _autocast(self):
        return runtime.autocast(self._device, self.autocast_dtype)

    # --- scoring ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        """requests: ((context, continuation) or None, context tokens, continuation tokens)."""
        items = []
        for i, (key, context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError(f"loglikelihood request {key!r} has an empty continuation")
            tokens = (list(context) + list(continuation))[-(self.max_length + 1):]  # left truncation
            items.append((i, tokens[:-1], min(len(continuation), len(tokens) - 1)))
        # longest first: the first batch shows at once whether memory suffices, padding stays small
        items.sort(key=lambda it: -len(it[1]))
        results: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
        for start in tqdm(range(0, len(items), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            batch = items[start:start + self.batch_size]
            width = len(batch[0][1])
            inp = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
            for b, (_, tokens, _) in enumerate(batch):
                inp[b, :len(tokens)] = torch.tensor(tokens)  # right padding: causal models never see it
            with self._autocast():
                logits, _ = self.model(inp.to(self._device))
            for b, (i, tokens, n) in enumerate(batch):
                # only the continuation's positions: the full (batch, length, vocab) log-softmax would be large
                scored = logits[b, len(tokens) - n:len(tokens)]
                lp = F.log_softmax(scored.to(torch.promote_types(scored.dtype, torch.float32)), -1)
                target = torch.tensor(requests[i][2][-n:], device=lp.device)
                answer = (lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all()))
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        windows, owner = [], []
        for i, req in enumerate(requests):
            (string,) = req.args
            for context, target in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ---------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        jobs = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            until, max_new = self._stop_rules(gen_kwargs)
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks ({max_new}) must be less than max_length ({self.max_length}): "
                                 f"a prompt keeps its last max_length - max_gen_toks tokens")
            prompt = self.tok_encode(context)[-(self.max_length - max_new):] or [self.eot_token_id]
            jobs.append((i, prompt, until, max_new))
        jobs.sort(key=lambda job: -len(job[1]))  # similar lengths together: few prompt tokens read stepwise
        out: List[Optional[str]] = [None] * len(requests)
        bar = tqdm(total=len(jobs), disable=disable_tqdm, desc="generate_until")
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start:start + self.batch_size]
            texts = self.greedy([p for _, p, _, _ in batch], [u for _, _, u, _ in batch],
                                [m for _, _, _, m in batch])
            for (i, _, _, _), text in zip(batch, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(batch))
        bar.close()
        return out

    def _stop_rules(self, gen_kwargs: Dict[str, Any]) -> Tuple[List[str], int]:
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if gen_kwargs.get("do_sample") and float(gen_kwargs.get("temperature", 1.0) or 0) > 0:
            log.warning("mom_bench decodes greedily; do_sample=True is ignored")
        max_new = gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_new_tokens", self.max_gen_toks))
        return [u for u in until if u], int(max_new)

    def greedy(self, prompts: List[List[int]], until: List[List[str]], max_new: List[int]) -> List[str]:
        """Greedy continuations of a batch of token prompts, cut before the first stop string."""
        return self.greedy_tokens(prompts, until, max_new)[1]

    def greedy_tokens(self, prompts: List[List[int]], until: List[List[str]],
                      max_new: List[int]) -> Tuple[List[List[int]], List[str]]:
        """The generated tokens of each prompt (up to the stop, EOS excluded) and their cut texts."""
        return generate.greedy(self.model, prompts, until, max_new, eos=self.eot_token_id, decode=self.tok_decode,
                               autocast=self._autocast, cuda_graph=self.cuda_graph)


def _name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name", None) or str(tokenizer or "bytes")


def _dtypes(choice: str, device: torch.device) -> Tuple[torch.dtype, Optional[torch.dtype]]:
    """(dtype of the weights, autocast dtype or None). Half precision runs as autocast over fp32 weights,
    as in training (gates, norms and the recurrent state stay fp32); float32/float64 cast the weights."""
    if choice in (None, "", "auto"):
        choice = "bfloat16" if device.type == "cuda" else "float32"
    if choice not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {choice!r}")
    dtype = DTYPES[choice]
    if dtype in (torch.bfloat16, torch.float16):
        return torch.float32, dtype
    return dtype, None


def _batch_size(value: int | str | None) -> int:
    if value is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(value, str) and value.startswith("auto"):
        log.warning("mom_bench has no automatic batch size; using %d", DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be positive, got {value}")
    return size


def cli(argv: Optional[List[str]] = None) -> None:
    """lm-eval's own command line, with the "mom_bench" model registered (this module is imported)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    cli()
