"""MQAR generator: layout, statistics, determinism, config checks, build_mqar and accuracy."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mom_bench.config import ConfigError, DataConfig, SliceConfig
from mom_bench.tasks import mqar as M
from mom_bench.tasks.mqar import MQARSlice, accuracy, build_mqar, check_mqar_params, mqar

IGN = -100


def check_layout(x, y, V, n, random_non_queries):
    """Every structural rule of the protocol, example by example."""
    N, L = x.shape
    assert x.dtype == y.dtype == torch.long and y.shape == (N, L)
    for xi, yi in zip(x.tolist(), y.tolist()):
        keys, vals = xi[0:2 * n:2], xi[1:2 * n:2]
        assert all(1 <= k < V // 2 for k in keys) and all(V // 2 <= v < V for v in vals)
        assert len(set(keys)) == n and len(set(vals)) == n
        pairs = dict(zip(keys, vals))
        qpos = [t for t in range(L) if yi[t] != IGN]
        # one query per key, on the even slots of the query region, never at the last input position
        assert sorted(xi[t] for t in qpos) == sorted(keys)
        assert all(t >= 2 * n and (t - 2 * n) % 2 == 0 and t <= L - 2 for t in qpos)
        for t in qpos:
            # next-token alignment: the target at the query is the token that followed the key in the block
            j = xi[:2 * n].index(xi[t])
            assert j % 2 == 0 and yi[t] == xi[j + 1] == pairs[xi[t]]
            if not random_non_queries:
                assert yi[t] not in xi[t + 1:]  # the answer never appears after its query
        assert all(yi[t] == IGN for t in range(L) if t not in qpos)
        if not random_non_queries:
            assert all(xi[t] == 0 for t in range(2 * n, L) if t not in qpos)
            assert sum(xi[2 * n:].count(k) for k in keys) == n  # each key queried exactly once
        else:
            assert all(0 <= tok < V for tok in xi)


@pytest.mark.parametrize("V,L,n", [(8192, 64, 4), (8192, 256, 16), (300, 128, 32), (17, 16, 4), (12, 8, 1)])
def test_layout(V, L, n):
    x, y = mqar(V, L, n, 300, seed=3)
    check_layout(x, y, V, n, random_non_queries=False)


def test_full_query_region_when_4n_equals_L():
    # space == n: every even slot of the query region is a query, in some order
    x, y = mqar(64, 32, 8, 200, seed=0)
    assert ((y != IGN).nonzero()[:, 1].view(200, 8) == torch.arange(16, 32, 2)).all()


def test_random_non_queries_only_changes_filler():
    V, L, n = 8192, 64, 4
    x0, y0 = mqar(V, L, n, 2000, seed=7)
    x1, y1 = mqar(V, L, n, 2000, seed=7, random_non_queries=True)
    check_layout(x1[:200], y1[:200], V, n, random_non_queries=True)
    assert torch.equal(y0, y1)
    struct = x0 != 0
    assert torch.equal(x0[struct], x1[struct])
    fill = x1[~struct]
    assert fill.min() >= 0 and fill.max() < V
    assert abs(fill.double().mean().item() - (V - 1) / 2) < 0.01 * V  # uniform on [0, V)
    assert fill.unique().numel() > 0.9 * V


def gaps_in_kv_order(x, y, n):
    """(N, n) numpy array: column i is the gap (query-region slot) at which key i of the kv block is queried."""
    N = len(x)
    pos = (y != IGN).nonzero()[:, 1].view(N, n)  # query positions, ascending
    match = x.gather(1, pos)[:, :, None] == x[:, None, 0:2 * n:2]  # (N, query, kv)
    q_of_kv = match.int().argmax(1)  # which query reads kv pair i
    return ((pos.gather(1, q_of_kv) - 2 * n) // 2).numpy()


def power_law(space, a):
    p = a * np.arange(1, space + 1) ** (a - 1.0)
    return p / p.sum()


def test_gap_distribution_favours_short_gaps():
    V, L, n, N = 8192, 64, 4, 20000
    space = (L - 2 * n) // 2
    x, y = mqar(V, L, n, N, seed=0, power_a=0.01)
    g = gaps_in_kv_order(x, y, n)
    uniform_mean = (space - 1) / 2
    assert g.mean() < 0.65 * uniform_mean  # about 7.1 against 13.5
    # the first pair's gap is the first draw: exactly p
    freq = np.bincount(g[:, 0], minlength=space) / N
    assert np.abs(freq - power_law(space, 0.01)).max() < 0.015
    # power_a = 1 is uniform
    xu, yu = mqar(V, L, n, N, seed=0, power_a=1.0)
    gu = gaps_in_kv_order(xu, yu, n)
    assert abs(gu.mean() - uniform_mean) < 0.3
    assert np.abs(np.bincount(gu.ravel(), minlength=space) / (N * n) - 1 / space).max() < 0.006


def test_gaps_match_numpy_choice_with_p():
    # The reference draws gaps with np.random.choice(space, n, replace=False, p=p); we sample the same law
    V, L, n, N, a = 8192, 64, 8, 20000, 0.01
    space = (L - 2 * n) // 2
    x, y = mqar(V, L, n, N, seed=1, power_a=a)
    ours = gaps_in_kv_order(x, y, n)
    rng = np.random.RandomState(0)
    p = power_law(space, a)
    ref = np.stack([rng.choice(space, n, replace=False, p=p) for _ in range(3000)])
    for col in (0, 1, n - 1):  # draw order matters: kv pair i gets the i-th gap drawn
        f_ours = np.bincount(ours[:, col], minlength=space) / len(ours)
        f_ref = np.bincount(ref[:, col], minlength=space) / len(ref)
        assert np.abs(f_ours - f_ref).max() < 0.04, col
    incl = lambda g: np.bincount(g.ravel(), minlength=space) / len(g)
    assert np.abs(incl(ours) - incl(ref)).max() < 0.05


def test_keys_and_values_uniform():
    V, L, n, N = 80, 64, 16, 20000
    x, _ = mqar(V, L, n, N, seed=2)
    keys, vals = x[:, 0:2 * n:2], x[:, 1:2 * n:2]
    kc = torch.bincount(keys.flatten(), minlength=V)[1:V // 2].double() / (N * n)
    vc = torch.bincount(vals.flatten(), minlength=V)[V // 2:].double() / (N * n)
    assert (kc - 1 / (V // 2 - 1)).abs().max() < 0.005
    assert (vc - 1 / (V // 2)).abs().max() < 0.005
    assert torch.bincount(keys.flatten(), minlength=V)[0] == 0


def test_determinism_and_rng_isolation():
    np.random.seed(123)
    torch.manual_seed(123)
    before_np, before_torch = np.random.get_state()[1].copy(), torch.get_rng_state()
    a = mqar(8192, 64, 4, 500, seed=5, random_non_queries=True)
    b = mqar(8192, 64, 4, 500, seed=5, random_non_queries=True)
    c = mqar(8192, 64, 4, 500, seed=6, random_non_queries=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    # generation leaves the callers' global generators alone
    assert (np.random.get_state()[1] == before_np).all()
    assert torch.equal(torch.get_rng_state(), before_torch)


@pytest.mark.parametrize("kwargs,match", [
    (dict(seq_len=63), r"seq_len must be even, got 63"),
    (dict(num_kv_pairs=20), r"num_kv_pairs: 4 \* num_kv_pairs must be <= seq_len \(got num_kv_pairs=20, seq_len=64\)"),
    (dict(vocab_size=64), r"vocab_size must be > seq_len"),
    (dict(vocab_size=4, seq_len=8, num_kv_pairs=2), r"vocab_size: the key range \[1, 2\).*num_kv_pairs=2"),
    (dict(vocab_size=0), r"vocab_size must be positive"),
    (dict(seq_len=-2), r"seq_len must be positive"),
    (dict(num_kv_pairs=0), r"num_kv_pairs must be positive"),
    (dict(num_examples=0), r"num_examples must be >= 1"),
    (dict(power_a=0.0), r"power_a must be"),
    (dict(power_a=-1.0), r"power_a must be"),
    (dict(power_a=float("nan")), r"power_a must be"),
    (dict(seed=-1), r"seed must be in \[0, 2\*\*32\)"),
    (dict(seq_len=64.0), r"seq_len must be an integer"),
    (dict(num_kv_pairs=True), r"num_kv_pairs must be an integer"),
])
def test_invalid_params(kwargs, match):
    args = dict(vocab_size=8192, seq_len=64, num_kv_pairs=4, num_examples=10, seed=0, power_a=0.01)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        check_mqar_params(**args)
    with pytest.raises(ConfigError, match=match):
        mqar(**args)
    assert issubclass(ConfigError, ValueError)


def small_cfg(**kw):
    cfg = DataConfig(vocab_size=512, train=[SliceConfig(64, 4, 50), SliceConfig(128, 8, 30)],
                     test=[SliceConfig(64, 4, 20), SliceConfig(256, 16, 10), SliceConfig(128, 32, 5)],
                     train_seed=0, test_seed=100)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("structured", [False, True])
def test_build_mqar(structured):
    cfg = small_cfg()
    node = OmegaConf.structured(cfg) if structured else cfg
    train, test = build_mqar(node)
    assert [s.name for s in train] == ["L64_n4", "L128_n8"]
    assert [s.name for s in test] == ["L64_n4", "L256_n16", "L128_n32"]
    assert all(isinstance(s, MQARSlice) for s in train + test)
    for i, s in enumerate(train):
        x, y = mqar(512, s.seq_len, s.num_kv_pairs, cfg.train[i].num_examples, seed=cfg.train_seed + i)
        assert torch.equal(s.inputs, x) and torch.equal(s.targets, y)
    for j, s in enumerate(test):
        x, y = mqar(512, s.seq_len, s.num_kv_pairs, cfg.test[j].num_examples, seed=cfg.test_seed + j)
        assert torch.equal(s.inputs, x) and torch.equal(s.targets, y)
    # the same (L, n) in train and test is different data
    assert not torch.equal(train[0].inputs[:20], test[0].inputs)


@pytest.mark.parametrize("train_seed,test_seed", [(0, 0), (0, 1), (5, 3), (7, 6)])
def test_build_mqar_rejects_overlapping_seeds(train_seed, test_seed):
    # train seeds {t, t+1}, test seeds {s, s+1, s+2}
    with pytest.raises(ConfigError, match=r"train_seed/test_seed.*overlap"):
        build_mqar(small_cfg(train_seed=train_seed, test_seed=test_seed))
    build_mqar(small_cfg(train_seed=train_seed, test_seed=train_seed + 2))  # adjacent but disjoint: fine


def test_build_mqar_validates_before_generating(monkeypatch):
    calls = []
    monkeypatch.setattr(M, "mqar", lambda *a, **k: calls.append(a))
    cfg = small_cfg()
    cfg.test.append(SliceConfig(63, 4, 10))
    with pytest.raises(ConfigError, match=r"data\.test\[3\]: seq_len must be even, got 63"):
        build_mqar(cfg)
    cfg = small_cfg(vocab_size=100)  # only the L=128 and L=256 slices break vocab_size > seq_len
    with pytest.raises(ConfigError, match=r"data\.train\[1\]: vocab_size must be > seq_len"):
        build_mqar(cfg)
    assert calls == []


def test_accuracy():
    targets = torch.tensor([[IGN, 5, IGN, 7], [3, IGN, IGN, IGN]])
    preds = torch.tensor([[5, 5, 0, 6], [3, 9, 9, 9]])  # right, wrong, right where counted; ignored elsewhere
    assert accuracy(preds, targets) == (2, 3)
    logits = torch.nn.functional.one_hot(preds, num_classes=10).float() * 3.0 - 1.0
    assert accuracy(logits, targets) == (2, 3)
    assert accuracy(targets.clamp(min=0), targets) == (3, 3)
    assert accuracy(preds, torch.full_like(targets, IGN)) == (0, 0)
    with pytest.raises(ValueError):
        accuracy(preds[:, :3], targets)
