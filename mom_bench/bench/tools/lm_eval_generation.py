"""Time lm-eval's greedy generation (`MomBenchLM.greedy_tokens`) of a MoM LM with and without the CUDA-graph
decoder, in one process: 4 layers, hidden 1024, 4x256 heads, random weights, byte tokenizer, bf16
autocast, a batch of 16 prompts of 200 to 500 bytes, 64 new tokens each (no stop string; EOS may end a
row earlier). The outputs of the two paths are compared row by row: their common prefix. Eagerly a
finished row leaves the batch, so later steps run at other batch sizes, and in bf16 the products' rounding
can differ with the batch size; a random-weight model's near-tied logits then flip. `float32` (TF32 off)
for an exact comparison:

    python -m mom_bench.bench.tools.lm_eval_generation [auto|float32]
"""
import sys
import time

import torch

from mom_bench.models import ModelConfig
from mom_bench.lm_eval_model import MomBenchLM
from mom_bench.models import build_model
from mom_bench.tokenizer import load_tokenizer


def main():
    tok = load_tokenizer(None)
    torch.manual_seed(0)
    cfg = ModelConfig(mixer="mom", d_model=1024, n_layers=4, num_heads=4, head_dim=256, mlp="swiglu",
                      mlp_ratio=2.0, embed_dropout=0.0, num_memories=4, topk=2)
    model = build_model(cfg, tok.vocab_size)
    prompts = [torch.randint(0, 256, (200 + 20 * i,)).tolist() for i in range(16)]
    dtype = sys.argv[1] if len(sys.argv) > 1 else "auto"
    torch.backends.cuda.matmul.allow_tf32 = False
    out = {}
    for graph in (False, True, False, True):  # twice each: the first call of each path compiles
        lm = MomBenchLM(model=model, tokenizer=tok, device="cuda", batch_size=16, cuda_graph=graph, dtype=dtype)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out[graph] = lm.greedy_tokens(prompts, [[] for _ in prompts], [64] * len(prompts))
        torch.cuda.synchronize()
        n = sum(len(g) for g in out[graph][0])
        print(f"cuda_graph={graph}: {time.perf_counter() - t0:.3f} s for {n} generated tokens "
              f"(longest {max(len(g) for g in out[graph][0])})", flush=True)
    common = [next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), min(len(g), len(e)))
              for g, e in zip(out[True][0], out[False][0])]
    print(f"dtype {dtype}: rows with the same tokens {sum(g == e for g, e in zip(out[True][0], out[False][0]))} "
          f"of {len(prompts)}; common prefix per row {common}; eager rows' lengths {[len(e) for e in out[False][0]]}")


if __name__ == "__main__":
    main()
