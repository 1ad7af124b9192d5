"""The MoM study: its sweep files pair MoM with single memories at exactly equal state, the router statistics
count what the router did, and the report's paired comparison from hand-made records."""
import csv
import math

import pytest
import torch
from hydra import compose, initialize_config_module

from mom_bench import records, router_stats, study
from mom_bench.config import register_configs
from mom_bench.models import ModelConfig, build_model
from mom_bench.report import write_report
from mom_bench.sweep import job_config, points
from mom_bench.train import load_config

register_configs()

# (MoM's file, its single memories' file); the knob files hold MoM alone
STUDIES = [("mom_study_equal_state", "mom_study_equal_state_single"),
           ("mom_study_extrapolation", "mom_study_extrapolation_single")]
KNOBS = ["mom_study_knobs", "mom_study_knobs_topk", "mom_study_knobs_shared", "mom_study_knobs_aux"]
NOT_MODEL = ("optim.lr=", "seed=")  # overrides that change neither the model nor the data


def sweep_points(name):
    """(resolved config, the lr and seed of every point that shares its model and data) per distinct model
    and data of a sweep file. Composing each of the ~500 points takes Hydra over a minute; lr and seed
    change neither state nor data, so one composed point per (model, data) stands for its lr x seed grid."""
    with initialize_config_module(version_base="1.3", config_module="mom_bench.conf"):
        master = compose("config", overrides=[f"sweep={name}"], return_hydra_config=True)
        groups = {}
        for p in points(master):
            rest = tuple(o for o in p if not o.startswith(NOT_MODEL))
            lr_seed = tuple(o for o in p if o.startswith(NOT_MODEL))
            groups.setdefault(rest, (p, set()))[1].add(lr_seed)
        out = []
        for first, lr_seeds in groups.values():
            config, _ = load_config(job_config(master, first))  # validated, as the sweep itself does
            out.append((config, frozenset(lr_seeds)))
        return out


def as_point(config, lr_seeds):
    m = config["model"]
    return {"sweep": config["sweep_name"], "train": records.train_label(config["data"]), "d_model": m["d_model"],
            "n_layers": m["n_layers"], "kind": study.memory_kind(m), "routed": m["mixer"] == "mom",
            "lr_seeds": lr_seeds, "model": m, "data": config["data"], "test": config["data"]["test"], **study.config_state(m)}


@pytest.fixture(scope="module")
def study_points():
    return {name: [as_point(*c) for c in sweep_points(name)] for pair in STUDIES for name in pair} | \
        {name: [as_point(*c) for c in sweep_points(name)] for name in KNOBS}


def test_every_point_has_its_partners_at_exactly_equal_state(study_points):
    for mom_file, single_file in STUDIES:
        pts = study_points[mom_file] + study_points[single_file]
        moms = [i for i, p in enumerate(pts) if p["routed"]]
        assert len(moms) == len(study_points[mom_file]) > 0 and len(pts) - len(moms) == 2 * len(moms)
        pairs = study.match(pts, key=study.MATCH_KEY + ("lr_seeds",))  # the same lr x seed grid on both sides
        for i in moms:  # each MoM point: one partner at its total state and one at its active state
            mine = sorted(b for m, _, b in pairs if m == i)
            assert mine == ["active", "total"], (pts[i]["model"], pts[i]["train"])
        assert sorted(j for _, j, _ in pairs) == [j for j in range(len(pts)) if not pts[j]["routed"]]
        for i, j, basis in pairs:
            mom, one = pts[i], pts[j]
            assert one["total"] == one["active"] == mom[basis]  # exact: heads scale, head dims stay
            assert (mom["model"]["num_memories"], mom["model"]["topk"], mom["model"]["shared_memory"]) == (4, 2, True)
            assert one["model"]["num_heads"] == {"total": 5, "active": 3}[basis] * mom["model"]["num_heads"]
            assert one["test"] == mom["test"] and len(mom["lr_seeds"]) == 6  # 2 lr x 3 seeds
        assert {p["kind"] for p in pts} == {"gated_delta", "gla"}
    cells = {p["train"] for p in study_points["mom_study_equal_state"]}
    assert cells == {"L256_n16", "L256_n64", "L512_n64", "L512_n128"}
    based = study_points["mom_study_extrapolation"][0]  # Based's protocol: tested past its longest training
    assert (max(s["seq_len"] for s in based["data"]["train"]), max(s["seq_len"] for s in based["test"])) == (256, 1024)


def test_knobs_move_one_at_a_time_from_the_default(study_points):
    default = {"num_memories": 4, "topk": 2, "shared_memory": True, "aux_loss_coef": 0.01}
    assert {k: getattr(ModelConfig(), k) for k in default} == default
    moved = set()
    for name in KNOBS:
        for p in study_points[name]:
            changed = {k: p["model"][k] for k in default if p["model"][k] != default[k]}
            assert len(changed) <= 1, changed
            moved |= set(changed.items())
            assert p["sweep"] == "mom_study_knobs" and len(p["lr_seeds"]) == 6
    assert moved == {("num_memories", 2), ("num_memories", 8), ("topk", 1), ("shared_memory", False),
                     ("aux_loss_coef", 0.0)}


def test_config_state_counts_memories_heads_and_head_dims(study_points):
    # By hand: a layer holds (memories) x H x K x V values; MoM's active memories are top-k + shared.
    for pts in study_points.values():
        for p in pts:
            m = p["model"]
            heads, v = m["num_heads"], m.get("head_dim") or m["d_model"] // m["num_heads"]
            layer = heads * v * v
            routed = m["mixer"] == "mom"
            shared = int(m.get("shared_memory", True))
            total = (m.get("num_memories", 4) + shared) if routed else 1
            active = (m.get("topk", 2) + shared) if routed else 1
            assert (p["total"], p["active"]) == (2 * total * layer, 2 * active * layer), m
    hedgehog = dict(mixer="hedgehog", d_model=64, num_heads=4, n_layers=2)  # twice the keys: 2 x 4 x 32 x 16
    assert study.config_state(hedgehog) == {"total": 4096, "active": 4096}
    assert study.config_state(dict(mixer="attention", d_model=64)) is None


def test_router_stats_count_the_routing():
    torch.manual_seed(0)
    model = build_model(ModelConfig(mixer="mom", d_model=16, num_heads=2, chunk_size=8, num_memories=4, topk=2,
                                    embed_dropout=0.0), vocab_size=32).eval()
    x = torch.randint(0, 32, (3, 16))
    probs = []
    hooks = [b.mixer.router.register_forward_hook(lambda mod, inp, out: probs.append(out.softmax(-1)))
             for b in model.blocks]
    with torch.no_grad():
        model(x)  # not collected: no sink is set outside `collect`
        assert all(getattr(b.mixer, "router_stats", None) is None for b in model.blocks)
        probs.clear()
        with router_stats.collect(model) as first:
            model(x)
            model(x[:1])
        sinks = [b.mixer.router_stats for b in model.blocks]
        assert sinks == [None, None]
        with router_stats.collect(model) as second:
            model(x[:1])
    for h in hooks:
        h.remove()
    assert [layer["module"] for layer in first.layers] == ["blocks.0.mixer", "blocks.1.mixer"]
    for layer, p in zip(first.layers, [torch.cat([probs[0], probs[2]]), torch.cat([probs[1], probs[3]])]):
        index = p.topk(2, -1).indices
        assert layer["tokens"] == 4 * 16 and (layer["memories"], layer["topk"]) == (4, 2)
        assert layer["fraction"] == pytest.approx((torch.bincount(index.flatten(), minlength=4) / index.numel()).tolist())
        assert layer["entropy"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)
        assert layer["max_entropy"] == pytest.approx(math.log(4))
    # the second collection starts from zero (its sums are the one-sequence batch's alone)
    assert second.layers[0]["tokens"] == 16
    assert second.layers[0]["entropy"] == pytest.approx(float(-(probs[4] * probs[4].log()).sum(-1).mean()), rel=1e-5)
    with router_stats.collect(build_model(ModelConfig(mixer="gla", d_model=16), 32)) as none:
        pass
    assert none.layers == []


def test_a_mom_run_records_its_router_statistics_per_evaluation(tmp_path):
    from mom_bench.config import DataConfig, OptimConfig, RunConfig, SliceConfig
    from mom_bench.train import train

    data = DataConfig(vocab_size=40, batch_size=16, test_batch_size=16, train=[SliceConfig(16, 2, 32)],
                      test=[SliceConfig(16, 2, 16), SliceConfig(32, 4, 16)])
    model = ModelConfig(mixer="mom", d_model=16, num_heads=2, chunk_size=8, num_memories=3, topk=1)
    rec = train(RunConfig(model=model, data=data, optim=OptimConfig(epochs=2, early_stop=1.0),
                          results_dir=str(tmp_path), progress=False, device="cpu"))
    assert rec["status"] == "complete", rec["reason"]
    for entry in rec["eval_history"]:
        assert [layer["module"] for layer in entry["router"]] == ["blocks.0.mixer", "blocks.1.mixer"]
        for layer in entry["router"]:  # every test token of both slices, routed to its top-1 of 3
            assert layer["tokens"] == 16 * 16 + 16 * 32 and layer["memories"] == 3
            assert sum(layer["fraction"]) == pytest.approx(1) and 0 <= layer["entropy"] <= math.log(3) + 1e-6
    assert study._router(rec) == rec["eval_history"][rec["best_epoch"] - 1]["router"]


def record(root, sweep, mixer, seed, acc, lr=1e-3, heads=1, router=None, **model):
    """A complete record as mom_bench.train writes it: 2 layers of head_dim 8 at d_model 16."""
    m = {"mixer": mixer, "d_model": 16, "n_layers": 2, "num_heads": heads, "head_dim": 8, "pattern": None,
         "num_memories": 4, "topk": 2, "shared_memory": True, "memory": "gla", "aux_loss_coef": 0.01, **model}
    data = {"train": [{"seq_len": 64, "num_kv_pairs": 4, "num_examples": 100}],
            "test": [{"seq_len": 64, "num_kv_pairs": 4, "num_examples": 10}]}
    config = {"model": m, "data": data, "optim": {"lr": lr}, "seed": seed, "sweep_name": sweep}
    state = study.config_state(m)
    rec = {"run_id": records.run_id(config), "status": "complete", "reason": None, "config": config,
           "hardware": {"device": "cpu", "device_name": "Test CPU"}, "accuracy": {"L64_n4": acc},
           "mean_accuracy": acc, "best_epoch": 2,
           "eval_history": [{"epoch": 1, "router": []}, {"epoch": 2, "router": router or []}],
           "model": {"label": mixer, "params": 100, "state_size": {**state, "total_bytes": 4 * state["total"],
                                                                  "active_bytes": 4 * state["active"]}}}
    records.write_record(records.record_path(root / sweep, rec["run_id"]), rec)


def layer(fraction, entropy):
    return {"module": "blocks.0.mixer", "memories": 4, "topk": 2, "tokens": 64, "fraction": fraction,
            "entropy": entropy, "max_entropy": math.log(4)}


def rows(path):
    return list(csv.DictReader(path.open()))


def test_report_pairs_seeds_and_draws_the_study(tmp_path):
    root = tmp_path / "results"
    # MoM (gla, E4 top-2 shared: 5 memories, 3 active) of 1 head; 8 x 8 values a head, 2 layers
    for seed, acc in [(1, 0.9), (2, 0.6), (3, 0.8)]:
        record(root, "st", "mom", seed, acc, router=[layer([0.4, 0.3, 0.2, 0.1], 0.5 * math.log(4))])
    for seed, acc in [(1, 0.7), (2, 0.7), (3, 0.8)]:  # 5 heads: MoM's total state; MoM wins, ties, loses
        record(root, "st", "gla", seed, acc, heads=5)
        record(root, "st", "gla", seed, acc - 0.5, lr=1e-2, heads=5)  # a worse lr: not the one compared
    for seed in (1, 2, 3):
        record(root, "st", "gla", seed, 0.5, heads=3)  # 3 heads: MoM's active state
        record(root, "st", "gla", seed, 1.0, heads=4)  # no MoM state of 4 heads: unpaired
        record(root, "st", "gated_deltanet", seed, 1.0, heads=5)  # MoM's total, another kind: unpaired
    record(root, "other", "gla", 1, 0.1, heads=5)  # MoM's total in another sweep: unpaired
    paths = write_report(root, tmp_path / "rep", execute=False)
    out = tmp_path / "rep" / "mom_study"

    pairs = rows(out / "pairs.csv")
    assert sorted((p["basis"], p["single"]) for p in pairs) == [("active", "gla (num_heads=3)"),
                                                                ("total", "gla (num_heads=5)")]
    total = next(p for p in pairs if p["basis"] == "total")
    assert (total["seeds"], total["wins"], total["ties"], total["losses"]) == ("3", "1", "1", "1")
    assert int(total["state"]) == 2 * 5 * 64 and float(total["single_lr"]) == 1e-3
    assert float(total["mean_diff"]) == pytest.approx((0.2 - 0.1 + 0.0) / 3)
    assert float(total["std_diff"]) == pytest.approx(float(torch.tensor([0.2, -0.1, 0.0]).std()))
    active = next(p for p in pairs if p["basis"] == "active")
    assert (active["wins"], int(active["state"])) == ("3", 2 * 3 * 64)
    assert float(active["mean_diff"]) == pytest.approx((0.9 + 0.6 + 0.8) / 3 - 0.5)

    pts = rows(out / "points.csv")
    mom = next(p for p in pts if p["model"] == "mom")
    assert float(mom["mean"]) == pytest.approx((0.9 + 0.6 + 0.8) / 3) and mom["n_seeds"] == "3"
    assert float(mom["mean_std"]) == pytest.approx(float(torch.tensor([0.9, 0.6, 0.8]).std()))
    assert (mom["state_total"], mom["state_active"]) == ("640", "384")
    assert len(pts) == 6  # mom, gla with 3, 4 and 5 heads, gated_deltanet (sweep st); gla (other)

    router = rows(out / "router.csv")
    assert len(router) == 3 and all(float(r["entropy_ratio"]) == pytest.approx(0.5) for r in router)
    md = (out / "mom_study.md").read_text()
    assert "| 1/3 " in md and "| 3/3 " in md and "0.033 ± 0.153" in md
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == sorted(f"{s}.{e}" for s in ("accuracy_vs_state_st", "accuracy_vs_state_other", "pairs_st",
                                                 "router_st") for e in ("png", "svg"))
    assert {out / "pairs.csv", out / "mom_study.md"} <= set(paths)
    assert all((out / "figures" / f).stat().st_size > 5000 for f in figures)


def test_no_study_folder_without_pairs_or_router_statistics(tmp_path):
    root = tmp_path / "results"
    record(root, "st", "gla", 1, 0.5, heads=3)
    write_report(root, tmp_path / "rep", execute=False)
    assert not (tmp_path / "rep" / "mom_study").exists()
