"""`python -m mom_bench bench`: our Triton core and layers against flash-linear-attention 0.6.0 and SDPA
attention, side by side in one process on one GPU.

Every case times a few contenders on the same inputs with `triton.testing.do_bench` (median) and divides
by the case's reference contender, so the table holds ratios measured in one run; absolute milliseconds
only mean something next to each other. Cases (the targets of issue 3 in brackets):

    kernel    gated delta rule core, ours vs fla `chunk_gated_delta_rule`            [<= 1.0x]
    layer     MoM layer, ours vs fla `MomAttention`, with both Gated DeltaNet layers and an SDPA layer
              for scale; hidden 1024, 4 x 256 heads at B8 x T2048 and B1 x T16384      [<= 0.4x]
              and at MQAR size, hidden 128, 2 x 64 heads, B128 x T512                  [<= 0.25x]
              plus peak memory of the forward+backward                                 [<= 1.0x]
    decode    one-token state update of a MoM layer (two routed memories + shared, B8, 4 x 256 heads,
              fp32 state) vs SDPA over a KV cache of 1K / 8K / 32K tokens (B8, 8 x 128 heads)   [<= 1.0x at 8K]
    generate  per-token decoding latency of a MoM LM vs an SDPA attention LM with a KV cache, at
              1K / 8K / 32K tokens of context                                 [flat; faster from 8K]

flash-linear-attention is imported only here (and in GPU tests), never by the models. On Hopper with
Triton < 3.7.1 its gated backward refuses to run (its issue 640); the guard is switched off for timing
only, since the work is the same but its dk is then not trustworthy. A contender that fails (fla not
installed, out of memory) is reported with its error and the rest goes on.

Output: the table on stdout, and `<out>/bench.md`, `<out>/bench.csv` and a run record
`<out>/runs/bench-<device>.json` (kind "bench") that `python -m mom_bench report` draws.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

Fn = Callable[[], object]
SUITES = ("kernel", "layer", "decode", "generate")


@dataclass
class Contender:
    name: str
    build: Callable[[], Dict[str, Fn]]  # pass name ("fwd", "fwd+bwd", "step") -> a closure to time


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
def time_ms(fn: Fn, rep: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=max(rep // 4, 5), rep=rep, return_mode="median"))


def peak_mb(fn: Fn) -> float:
    """Peak memory allocated while fn runs, above what was allocated before (MB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


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
        from mom_bench.kernels.triton_chunk import chunk_memory

        x = gdn_inputs(B, T, H, K, dtype)
        return passes(lambda: chunk_memory(x[0], x[1], x[2], g=x[3], beta=x[4], delta=True,
                                           normalize_qk=True)[0], list(x))

    def fla():
        f = _fla("fla.ops.gated_delta_rule").chunk_gated_delta_rule
        x = gdn_inputs(B, T, H, K, dtype)
        return passes(lambda: f(*x, use_qk_l2norm_in_kernel=True)[0], list(x))

    return Case("kernel", f"gated delta rule H{H} K=V={K}", B, T,
                [Contender("ours", ours), Contender("fla chunk_gated_delta_rule", fla)],
                reference="fla chunk_gated_delta_rule", target="<= 1.0x" if K == 256 else "")


def _module_passes(module: torch.nn.Module, B, T, D, dtype) -> Dict[str, Fn]:
    module = module.to(device="cuda", dtype=dtype)
    x = torch.randn(B, T, D, device="cuda", dtype=dtype, requires_grad=True)
    return passes(lambda: _first(module(x)), [x] + list(module.parameters()))


def layer_case(B, T, D, H, head_dim, dtype, target) -> Case:
    from mom_bench.models import Attention, MemoryMixer

    mom = dict(num_memories=4, topk=2, shared_memory=True)
    attn_heads = max(D // 128, 1)
    contenders = [
        Contender("ours MoM", lambda: _module_passes(
            MemoryMixer(D, H, head_dim, kind="gated_delta", **mom), B, T, D, dtype)),
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
        from mom_bench.kernels import memory_step

        S = torch.zeros(B, M, H, K, K, device="cuda")
        idx = torch.stack([torch.randperm(M - 1, device="cuda")[:2] for _ in range(B)])
        idx = torch.cat([idx, torch.full((B, 1), M - 1, device="cuda")], 1)  # (B, 3) memories to update
        q, k, v = (torch.randn(B * active, H, K, device="cuda", dtype=dtype) for _ in range(3))
        g = -torch.rand(B * active, H, device="cuda")
        beta = torch.rand(B * active, H, device="cuda", dtype=dtype)
        flat = (torch.arange(B, device="cuda")[:, None] * M + idx).flatten()

        def step():  # as MemoryMixer.step: gather the selected memories, one step, write them back
            o, s = memory_step(q, k, v, S.view(B * M, H, K, K).index_select(0, flat), g=g, beta=beta, delta=True,
                               normalize_qk=True)
            S.view(B * M, H, K, K).index_copy_(0, flat, s)
            return o

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
    from mom_bench.config import ModelConfig
    from mom_bench.models import build_model

    B, D, layers, vocab = 8, 1024, 4, 32000

    def lm(mixer, n):
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
            return {"step": lambda: model.step(token, state)}
        return build

    contenders = [Contender(f"{name} LM, context {n // 1024}K", lm(mixer, n))
                  for n in contexts for mixer, name in (("mom", "ours MoM"), ("attention", "SDPA attention"))]
    ref = f"SDPA attention LM, context {8 if 8192 in contexts else contexts[0] // 1024}K"
    return Case("generate", f"{layers} layers, hidden {D}, B{B}, one token", B, 1, contenders, reference=ref,
                target="flat; faster from 8K")


def build_cases(suites, dtype, quick: bool) -> List[Case]:
    contexts = [1024, 8192] if quick else [1024, 8192, 32768]
    cases = []
    if "kernel" in suites:
        cases += [kernel_case(8, 2048, 4, 256, dtype), kernel_case(8, 2048, 16, 64, dtype)]
    if "layer" in suites:
        cases.append(layer_case(8, 2048, 1024, 4, 256, dtype, "<= 0.4x, memory <= 1.0x"))
        if not quick:
            cases.append(layer_case(1, 16384, 1024, 4, 256, dtype, "<= 0.4x"))
        cases.append(layer_case(128, 512, 128, 2, 64, dtype, "<= 0.25x"))
    if "decode" in suites:
        cases.append(decode_case(contexts, dtype))
    if "generate" in suites:
        cases.append(generate_case(contexts, dtype))
    return cases


# --- running and reporting ---------------------------------------------------------------------------
class ContenderTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Give up on a contender after `seconds` (first-call autotuning of some kernels takes minutes)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(*_):
        raise ContenderTimeout(f"gave up after {seconds} s (compiling and autotuning included)")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_case(case: Case, rep: int, log, limit_s: int = 0, profiles: Optional[List[str]] = None,
             after: Optional[Callable[[], None]] = None) -> None:
    """Time every contender of a case; `after` runs once each contender is done (to save progress)."""
    ms: Dict[tuple, float] = {}
    for c in case.contenders:
        try:
            with time_limit(limit_s):
                _run_contender(case, c, rep, ms, profiles)
        except Exception as exc:  # noqa: BLE001 - one failing contender must not end the benchmark
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            case.rows = [r for r in case.rows if r["name"] != c.name]  # no half-measured contender
            for key in [key for key in ms if key[0] == c.name]:
                del ms[key]
            case.rows.append(dict(suite=case.suite, case=case.name, name=c.name, batch_size=case.batch_size,
                                  seq_len=case.seq_len, **{"pass": "-"}, ms=None, error=msg))
        finally:
            torch.cuda.empty_cache()
        log(f"  {c.name}: " + ", ".join(f"{r['pass']} {r['ms']:.3f} ms" if r["ms"] is not None else r["error"]
                                         for r in case.rows if r["name"] == c.name))
        _ratios(case, ms)
        if after:
            after()


def profile(fn: Fn, iters: int = 3, top: int = 15) -> str:
    """The GPU kernels that dominate fn, by total CUDA time (torch.profiler), as a table."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60)


def _run_contender(case: Case, c: Contender, rep: int, ms: Dict[tuple, float], profiles=None) -> None:
    fns = c.build()
    for p, fn in fns.items():
        if profiles is not None and c.name.startswith("ours"):
            profiles.append(f"## {case.suite}: {case.name}, B{case.batch_size} x T{case.seq_len}: {c.name}, "
                            f"{p}\n\n{profile(fn)}\n")
        ms[c.name, p] = time_ms(fn, rep)
        row = dict(suite=case.suite, case=case.name, name=c.name, batch_size=case.batch_size,
                   seq_len=case.seq_len, **{"pass": p}, ms=ms[c.name, p])
        if case.memory and p == "fwd+bwd":
            row["peak_mb"] = peak_mb(fn)
        case.rows.append(row)


def _ratios(case: Case, ms: Dict[tuple, float]) -> None:
    ref_mem = {r["pass"]: r.get("peak_mb") for r in case.rows if r["name"] == case.reference}
    for r in case.rows:
        ref = ms.get((case.reference, r["pass"]))
        if r["ms"] is not None and ref:
            r["ratio"] = r["ms"] / ref
        if r.get("peak_mb") is not None and ref_mem.get(r["pass"]):
            r["memory_ratio"] = r["peak_mb"] / ref_mem[r["pass"]]
        if r["ms"]:
            r["tokens_per_s"] = r["batch_size"] * r["seq_len"] / (r["ms"] * 1e-3)


def title(case: Case) -> str:
    return f"{case.suite}: {case.name}, B{case.batch_size} x T{case.seq_len}"


def hardware() -> dict:
    import triton

    info = dict(device_name=torch.cuda.get_device_name(), started=time.strftime("%Y%m%d-%H%M%S"), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version())
    try:
        import fla

        info["fla"] = getattr(fla, "__version__", "?")
    except ImportError:
        info["fla"] = None
    return info


def markdown(cases: List[Case], hw: dict, command: str) -> str:
    lines = [f"# mom_bench bench on {hw['device_name']}", "",
             "versions: " + ", ".join(f"{k} {v}" for k, v in hw.items() if k not in ("device_name", "started")),
             f"command: `{command}`", ""]
    for case in cases:
        lines += [f"## {case.suite}: {case.name}, B{case.batch_size} x T{case.seq_len}"
                  + (f" (target {case.target} of {case.reference})" if case.target else ""), "",
                  "| contender | pass | ms | ratio | peak MB | memory ratio |", "|---|---|---|---|---|---|"]
        for r in case.rows:
            if r["ms"] is None:
                lines.append(f"| {r['name']} | - | failed: {r['error']} | | | |")
                continue
            fmt = lambda key, f: format(r[key], f) if r.get(key) is not None else ""  # noqa: E731
            lines.append(f"| {r['name']} | {r['pass']} | {r['ms']:.3f} | {fmt('ratio', '.2f')} | "
                         f"{fmt('peak_mb', '.0f')} | {fmt('memory_ratio', '.2f')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mom_bench bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--rep", type=int, default=100, help="milliseconds of repetitions per timing (do_bench)")
    ap.add_argument("--quick", action="store_true", help="skip the longest shapes (B1 x T16384, 32K context)")
    ap.add_argument("--out", default="outputs/bench", help="folder for bench.md, bench.csv and the run record")
    ap.add_argument("--case", default="", help="comma-separated substrings: run only the cases whose title "
                    "(as printed, e.g. 'B1 x T16384') contains one")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only the contenders whose "
                    "name contains one (ratios need the case's reference among them)")
    ap.add_argument("--profile", action="store_true",
                    help="also write <out>/profile.txt: the kernels that dominate each of our contenders")
    ap.add_argument("--limit", type=int, default=300,
                    help="seconds after which one contender is given up (0: no limit)")
    args = ap.parse_args(argv)
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        ap.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    if not torch.cuda.is_available():
        print("error: the benchmark needs a CUDA GPU (the Triton kernels and fla do not run timed on a CPU)",
              file=sys.stderr)
        return 1
    from mom_bench import kernels

    kernels.set_backend("triton")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    command = "python -m mom_bench bench " + " ".join(argv if argv is not None else sys.argv[1:])
    hw = hardware()
    cases = build_cases(suites, dtype, args.quick)
    picked = [s for s in args.case.split(",") if s]
    cases = [c for c in cases if not picked or any(s in title(c) for s in picked)]
    only = [s for s in args.only.split(",") if s]
    for case in cases if only else []:
        case.contenders = [c for c in case.contenders if any(s in c.name for s in only)]
    start, out = time.time(), Path(args.out)
    profiles: Optional[List[str]] = [] if args.profile else None
    if not cases:
        ap.error("no case left after --suite/--case")
    started: List[Case] = []

    def save(complete: bool = False) -> None:  # after every contender: a run that dies keeps what it measured
        write(out, started, hw, command, time.time() - start, complete)
        if profiles:
            (out / "profile.txt").write_text("\n".join(profiles))

    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {title(case)}", flush=True)
        started.append(case)
        run_case(case, args.rep, lambda s: print(s, flush=True), args.limit, profiles, after=save)
    save(complete=True)
    text = markdown(cases, hw, command)
    print(text)
    return 0


def write(out: Path, cases: List[Case], hw: dict, command: str, seconds: float, complete: bool) -> str:
    """bench.md, bench.csv and the run record of what has been measured so far."""
    import pandas as pd

    (out / "runs").mkdir(parents=True, exist_ok=True)
    text = markdown(cases, hw, command)
    (out / "bench.md").write_text(text + "\n")
    rows = [r for c in cases for r in c.rows]
    pd.DataFrame(rows).to_csv(out / "bench.csv", index=False)
    run_id = f"bench-{hw['device_name'].replace(' ', '_')}-{hw['started']}"
    record = dict(kind="bench", run_id=run_id, status="complete" if complete else "running", reason=None,
                  hardware=hw, command=command, seconds=seconds, timings=[r for r in rows if r["ms"] is not None])
    tmp = out / "runs" / f"{run_id}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out / "runs" / f"{run_id}.json")
    return text


if __name__ == "__main__":
    sys.exit(main())
