"""Greedy generation from a `LanguageModel`: a batch of token prompts prefilled in one parallel pass up to
the length they share, the rest of each prompt read step by step, then decoded token by token from the
mixers' state until EOS, a length limit or a stop string."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, List, Sequence, Tuple

import torch

from .lm import GraphedDecoder, LanguageModel


@torch.no_grad()
def greedy(model: LanguageModel, prompts: List[List[int]], until: List[List[str]], max_new: List[int], *,
           eos: int, decode: Callable[[Sequence[int]], str], autocast: Callable = nullcontext,
           cuda_graph: bool = True) -> Tuple[List[List[int]], List[str]]:
    """The generated tokens of each prompt (up to the stop, EOS excluded) and their texts cut before the
    first stop string. `decode` turns tokens into text (to find the stop strings); `autocast()` gives the
    precision context of the model's calls; `cuda_graph` replays the step from a CUDA graph where it can."""
    device = model.embed.weight.device
    B = len(prompts)
    shared = min(len(p) for p in prompts)
    with autocast():
        logits, state = model.prefill(torch.tensor([p[:shared] for p in prompts], device=device))
        # A step at small batch costs its launches, not its GPU time: replay it from a CUDA graph where
        # the state has a fixed size. The graph's batch is fixed too, so finished sequences stay in it,
        # fed EOS, their rows unread; eagerly, they leave the batch and its state.
        graph = GraphedDecoder(model, state) if cuda_graph and GraphedDecoder.supports(model) else None
    logits = logits[:, -1]
    generated: List[List[int]] = [[] for _ in range(B)]
    texts = [""] * B
    active = list(range(B))  # the sequences still decoding; sequence active[i] is row rows[i] of logits
    rows = list(range(B))
    pos = shared  # tokens read so far by every active sequence
    while active:
        next_tokens, keep = [], []
        choice = logits.float().argmax(-1).tolist()
        for i, b in enumerate(active):
            if pos < len(prompts[b]):  # still reading its prompt
                next_tokens.append(prompts[b][pos])
                keep.append(i)
                continue
            token = choice[rows[i]]
            done = token == eos
            if not done:
                generated[b].append(token)
                texts[b] = decode(generated[b])
                done = len(generated[b]) >= max_new[b] or any(u in texts[b] for u in until[b])
            if not done:
                next_tokens.append(token)
                keep.append(i)
        if not keep:
            break
        if graph is not None:
            active, rows = [active[i] for i in keep], [rows[i] for i in keep]
            tokens = [eos] * B
            for r, token in zip(rows, next_tokens):
                tokens[r] = token
            logits = graph.step(torch.tensor(tokens, device=device))
        else:
            if len(keep) < len(active):  # finished sequences leave the batch and its state
                state = select_rows(state, torch.tensor([rows[i] for i in keep], device=device))
                active, rows = [active[i] for i in keep], list(range(len(keep)))
            with autocast():
                logits, state = model.step(torch.tensor(next_tokens, device=device), state)
        pos += 1
    return generated, [cut(texts[b], until[b]) for b in range(B)]


def cut(text: str, until: List[str]) -> str:
    """`text` before the first of its stop strings."""
    for stop in until:
        text = text.split(stop)[0]
    return text


def select_rows(state: Any, index: torch.Tensor) -> Any:
    """The rows `index` of a decoding state: every mixer keeps the batch in dim 0 of its tensors."""
    if isinstance(state, torch.Tensor):
        return state.index_select(0, index)
    if isinstance(state, dict):
        return {k: select_rows(v, index) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(select_rows(v, index) for v in state)
    return state
