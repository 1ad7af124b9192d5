"""A language model around any mixer: embedding, pre-norm blocks, optional SwiGLU MLP, tied head.

`pattern` lists one mixer name per layer, so hybrids (three MoM layers to one attention layer, say) are
configs, not code. `forward` is the parallel form for training; `step` decodes one token with explicit
per-layer state and computes the same function; `prefill` runs the parallel form over a prompt and
returns the state `step` continues from (every mixer has `prefill(x) -> (y, state)`).

Zoology's architecture is a set of options (ModelConfig, "Zoology's architecture"): LayerNorm for the
norms (`norm`), learned absolute position embeddings added to the token embeddings before the embedding
dropout (`max_positions` rows), an identity MLP that still adds its norm's output to the residual (an
`nn.Identity` as `mlp`: Zoology's block computes x + mixer(norm1(x)), then x + state_mixer(norm2(x))), and
Zoology's initialisation (`zoology_init`).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .attention import Attention
from .layers import SwiGLU, block_norm
from .memory import MemoryMixer

Tensor = torch.Tensor


class Block(nn.Module):
    def __init__(self, d_model: int, mixer: nn.Module, mlp: Optional[nn.Module], norm: str = "rms"):
        super().__init__()
        self.norm1, self.mixer = block_norm(norm, d_model), mixer
        self.norm2, self.mlp = (block_norm(norm, d_model), mlp) if mlp is not None else (None, None)

    def forward(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        y, aux = self.mixer(self.norm1(x))
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x, aux

    def step(self, x: Tensor, state) -> Tuple[Tensor, object]:
        return self._residual(x, *self.mixer.step(self.norm1(x), state))

    def prefill(self, x: Tensor) -> Tuple[Tensor, object]:
        return self._residual(x, *self.mixer.prefill(self.norm1(x)))

    def _residual(self, x: Tensor, y: Tensor, state) -> Tuple[Tensor, object]:
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x, state


class LanguageModel(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, mixers: List[nn.Module],
                 mlp_factory: Optional[Callable[[], nn.Module]] = None, embed_dropout: float = 0.0,
                 norm: str = "rms", max_positions: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        # learned absolute positions (Zoology's figure-2 attention): one row per position up to the longest input
        self.pos = nn.Embedding(max_positions, d_model) if max_positions else None
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, std=0.02)
        self.drop = nn.Dropout(embed_dropout)
        self.blocks = nn.ModuleList(Block(d_model, m, mlp_factory() if mlp_factory else None, norm) for m in mixers)
        self.norm = block_norm(norm, d_model)

    def _embed(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids)
        if self.pos is not None:  # added before the dropout, as Zoology's embeddings are
            T = input_ids.shape[1]
            if T > self.pos.num_embeddings:
                raise ValueError(f"an input of {T} tokens is longer than the {self.pos.num_embeddings} learned "
                                 f"positions (model.max_positions)")
            x = x + self.pos(torch.arange(T, device=input_ids.device))
        return self.drop(x)

    def forward(self, input_ids: Tensor, positions: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Logits (B, T, V) and the summed auxiliary loss of the layers (0 without MoM layers).

        `positions` (B, P), indices along T, asks for the logits there only: (B, P, V). MQAR supervises n
        of L positions, and the head and the loss over all L were most of a step's memory and time."""
        x = self._embed(input_ids)
        aux = torch.zeros((), device=x.device)
        for block in self.blocks:
            x, a = block(x)
            if a is not None:
                aux = aux + a
        if positions is not None:
            x = x.gather(1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self.norm(x) @ self.embed.weight.T, aux  # tied head

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> List[object]:
        device = device or self.embed.weight.device
        return [b.mixer.init_state(batch, device, dtype) for b in self.blocks]

    @torch.no_grad()
    def step(self, token: Tensor, state: List[object]) -> Tuple[Tensor, List[object]]:
        """One token (B,) -> logits (B, V) and the new state."""
        if self.pos is not None:  # the state does not carry the token's position
            raise NotImplementedError("decoding step by step with learned positions is not supported; the "
                                      "parallel forms (forward, prefill) are")
        x = self.embed(token)
        new_state = []
        for block, s in zip(self.blocks, state):
            x, s = block.step(x, s)
            new_state.append(s)
        return self.norm(x) @ self.embed.weight.T, new_state

    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> Tuple[Tensor, List[object]]:
        """A prompt (B, T) -> logits (B, T, V) of the parallel form and the per-layer state after its last
        token, from which `step` continues exactly as if it had stepped through the prompt."""
        x = self._embed(input_ids)
        state = []
        for block in self.blocks:
            x, s = block.prefill(x)
            state.append(s)
        return self.norm(x) @ self.embed.weight.T, state

    def state_size(self, seq_len: int) -> Dict[str, int]:
        sizes = [b.mixer.state_size(seq_len) for b in self.blocks]
        return {key: sum(s[key] for s in sizes) for key in ("total", "active")}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def zoology_init(model: LanguageModel) -> None:
    """Zoology's initialisation (zoology/model.py, `_init_weights` of its TransformerBlock models), in place.

    Every nn.Linear weight and every embedding (tokens, positions) ~ N(0, 0.02), Linear biases zero; then
    the output projections that Zoology names `out_proj` / `fc2` (its attention's and sliding-window
    attention's output, the MLP's second layer) ~ N(0, 0.02 / sqrt(2 n_layers)), the GPT-2 scaling for the
    residual path's depth. Zoology's fla-based mixers (GLA, DeltaNet, Gated DeltaNet) name theirs
    `o_proj` and Based `proj_o`, which that rule does not match: their output projections keep std 0.02,
    and so do ours. The memory mixers' projection matrices that are parameters rather than nn.Linear
    (`w_q`, the fused per-memory `w_in`) stand for fla's q/k/v/gate Linears and get N(0, 0.02) too; norms,
    convolution taps and decay parameters keep their own initialisation, as in Zoology."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, MemoryMixer):
            for p in (m.w_q, m.w_in):
                nn.init.normal_(p, std=0.02)
    scaled = 0.02 / math.sqrt(2 * len(model.blocks))
    for block in model.blocks:
        if isinstance(block.mixer, Attention):  # sliding_window's class is Attention's too
            nn.init.normal_(block.mixer.out.weight, std=scaled)
        if isinstance(block.mlp, SwiGLU):
            nn.init.normal_(block.mlp.down.weight, std=scaled)


class GraphedDecoder:
    """`LanguageModel.step` for one fixed batch, captured once as a CUDA graph and replayed per token.

    At small batch one decoding step is a few hundred small kernels whose launch cost (Python, dispatch,
    Triton's launcher) is far above their GPU time; a replay issues them all at once. Only fixed-size
    states qualify: the memory mixers update theirs in place, whereas attention's KV cache grows, so a
    model with an attention layer is refused.

        decoder = GraphedDecoder(model, state)   # state from model.init_state or model.prefill
        logits = decoder.step(token)             # (B,) -> (B, V); decoder.state advances in place

    `logits` is the graph's output buffer, overwritten by the next step: copy what must be kept.
    """

    def __init__(self, model: LanguageModel, state: List[Dict[str, Tensor]]):
        if not all(isinstance(b.mixer, MemoryMixer) for b in model.blocks):
            raise ValueError("a CUDA-graph decoder needs fixed-size state: every layer must be a memory mixer "
                             "(attention's KV cache grows)")
        device = model.embed.weight.device
        if device.type != "cuda":
            raise ValueError(f"a CUDA-graph decoder needs the model on a CUDA device, not {device}")
        self.model, self.state = model, state
        self.token = torch.zeros(len(state[0]["S"]), dtype=torch.long, device=device)
        saved = [{k: v.clone() for k, v in s.items()} for s in state]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # a first eager step compiles the kernels and warms the allocator
            model.step(self.token, state)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, _ = model.step(self.token, state)
        for s, s0 in zip(state, saved):  # undo the warm-up step (capturing runs nothing)
            for k, v in s.items():
                v.copy_(s0[k])

    @staticmethod
    def supports(model: LanguageModel) -> bool:
        """Whether `model` can be decoded so: on a CUDA device, every layer a memory mixer."""
        return model.embed.weight.is_cuda and all(isinstance(b.mixer, MemoryMixer) for b in model.blocks)

    def step(self, token: Tensor) -> Tensor:
        self.token.copy_(token)
        self.graph.replay()
        return self.logits

