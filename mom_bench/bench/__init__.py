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
    train     one MQAR optimizer step (mom_bench.train's) of every mixer's 2-layer LM, eager and
              replayed from CUDA graphs, vs LMs of fla layers; B512 x L64 x d64, B128 x L512 x d128,
              B128 x L512 x d512 with 2 heads and with 1 (head dim 512)
    sweep     the sweep command on a fixed cut of the Zoology figure 2 grid, per launcher setting (--jobs):
              runs per hour, the GPU-hours projected for the whole grid, evaluation against training
              time (throughput.py)

flash-linear-attention is imported only in `cases.py` (and in GPU tests), never by the models. On Hopper with
Triton < 3.7.1 its gated backward refuses to run (its issue 640); the guard is switched off for timing
only, since the work is the same but its dk is then not trustworthy. A contender that fails (fla not
installed, out of memory) is reported with its error and the rest goes on.

Output: the table on stdout, and `<out>/bench.md`, `<out>/bench.csv` and a run record
`<out>/runs/bench-<device>-<start time>.json` (kind "bench") that `python -m mom_bench report` draws.
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from mom_bench import records, runtime

from . import throughput
from .cases import SUITES, Case, Contender, Fn, build_cases

__all__ = ["main", "run_case", "build_cases", "Case", "Contender", "SUITES"]


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
        if case.memory and c.memory and p == "fwd+bwd":
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

    return dict(device_name=torch.cuda.get_device_name(), started=time.strftime("%Y%m%d-%H%M%S"),
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), fla=runtime.version("fla-core"))


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
    ap.add_argument("--suite", default=",".join(s for s in SUITES if s != "sweep"),
                    help=f"comma-separated subset of {','.join(SUITES)} (default: all but sweep, which trains "
                    "28 models per launcher setting)")
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
    ap.add_argument("--jobs", default="1,4", help="the sweep suite's launcher settings: comma-separated "
                    "worker counts on the one GPU (1: one process)")
    ap.add_argument("--sweep-limit", type=float, default=0, help="seconds after which the sweep suite stops "
                    "a setting's sweep and summarizes the runs it completed (0: no limit)")
    ap.add_argument("--sweep-overrides", default="", help="space-separated overrides for the sweep suite's "
                    "command, e.g. 'data=zoology_L64' for the cut's short half")
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
    jobs = [int(j) for j in args.jobs.split(",") if j.strip()] if "sweep" in suites else []
    if not cases and not jobs:
        ap.error("no case left after --suite/--case")
    started: List[Case] = []
    sweeps: List[dict] = []

    def save(complete: bool = False) -> None:  # after every contender: a run that dies keeps what it measured
        write(out, started, hw, command, time.time() - start, complete, sweeps)
        if profiles:
            (out / "profile.txt").write_text("\n".join(profiles))

    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {title(case)}", flush=True)
        started.append(case)
        run_case(case, args.rep, lambda s: print(s, flush=True), args.limit, profiles, after=save)
    for n in jobs:
        sweeps.append(throughput.run_setting(out, n, args.sweep_overrides.split(), limit_s=args.sweep_limit))
        save()
    save(complete=True)
    print(markdown(cases, hw, command) + ("\n" + throughput.markdown(sweeps) if sweeps else ""))
    return 0


def write(out: Path, cases: List[Case], hw: dict, command: str, seconds: float, complete: bool,
          sweeps: Optional[List[dict]] = None) -> str:
    """bench.md, bench.csv and the run record of what has been measured so far."""
    import pandas as pd

    (out / "runs").mkdir(parents=True, exist_ok=True)
    text = markdown(cases, hw, command) + ("\n" + throughput.markdown(sweeps) if sweeps else "")
    (out / "bench.md").write_text(text + "\n")
    rows = [r for c in cases for r in c.rows]
    pd.DataFrame(rows).to_csv(out / "bench.csv", index=False)
    run_id = f"bench-{hw['device_name'].replace(' ', '_')}-{hw['started']}"
    record = dict(kind="bench", run_id=run_id, status="complete" if complete else "running", reason=None,
                  hardware=hw, command=command, seconds=seconds, timings=[r for r in rows if r["ms"] is not None],
                  sweeps=sweeps or [])
    records.write_record(records.record_path(out, run_id), record)
    return text


if __name__ == "__main__":
    sys.exit(main())
