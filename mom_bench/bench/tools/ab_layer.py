"""The MoM layer of this tree against the same layer of another revision, side by side in one process on
one GPU (bf16, fwd+bwd): the CPU's time to enqueue one call, the wall time per call in a loop, and the
do_bench time, alternating between the two so that drifts of the host hit both alike. Checks first that
both give the same output and gradients from the same weights.

    rev=HEAD~1; mkdir -p /tmp/old/oldmb && git archive $rev models kernels | tar -x -C /tmp/old/oldmb
    touch /tmp/old/oldmb/__init__.py
    python -m mom_bench.bench.tools.ab_layer /tmp/old [mqar] [big] [long]

The case names are those of profile_layers.py.
"""
import sys

from triton.testing import do_bench

from .profile_layers import CASES, build, enqueue_ms


def fwd_bwd_of(m, x, gy):
    def run():
        for p in m.parameters():
            p.grad = None
        x.grad = None
        m(x)[0].backward(gy)
    return run


def compare(name, old_mixer):
    new, x, gy = build(name)
    B, T, D, H, hd, memories = CASES[name]
    old = old_mixer(D, H, hd, kind="gated_delta", num_memories=memories, topk=2, shared_memory=True)
    old = old.cuda().bfloat16()
    old.load_state_dict(new.state_dict())
    runs = {"old": fwd_bwd_of(old, x, gy), "new": fwd_bwd_of(new, x, gy)}
    results = {}
    for label, m in (("old", old), ("new", new)):
        runs[label]()
        results[label] = [t.grad.float().clone() for t in (x, *m.parameters())]
    worst = max(((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(results["new"], results["old"]))
    times = {label: [] for label in runs}
    for _ in range(3):
        for label, fn in runs.items():
            times[label].append(enqueue_ms(fn))
    bench = {label: do_bench(fn, rep=300) for label, fn in runs.items()}
    print(f"### {name}: largest relative gradient difference new vs old {worst:.1e}")
    print("| version | CPU enqueue ms (3 runs of 20) | wall ms per call | do_bench ms |")
    print("|---|---|---|---|")
    for label in runs:
        cpu = " / ".join(f"{c:.2f}" for c, _ in times[label])
        wall = " / ".join(f"{w:.2f}" for _, w in times[label])
        print(f"| {label} | {cpu} | {wall} | {bench[label]:.2f} |", flush=True)


def main():
    sys.path.insert(0, sys.argv[1])  # the other revision's copy, as package oldmb
    from oldmb.models.memory import MemoryMixer as OldMixer
    for case in sys.argv[2:] or ["mqar"]:
        compare(case, OldMixer)


if __name__ == "__main__":
    main()
