"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology (arXiv 2312.04927).

Protocol (as the generator of HazyResearch/zoology, zoology/data/associative_recall.py, _mqar, runs it):

- Parameters: vocab_size V, seq_len L (even), num_kv_pairs n, power_a a, random_non_queries, seed.
  Constraints: 4n <= L and V > L.
- Keys: n distinct tokens from [1, V//2); values: n distinct tokens from [V//2, V), uniformly, in random order.
- The sequence opens with the block k1 v1 k2 v2 ... kn vn (2n tokens).
- The query region that follows has space = (L - 2n) / 2 even slots. n distinct gaps are drawn without
  replacement from range(space) with probability proportional to a * i**(a - 1), i = 1..space (short gaps
  favoured); key i is placed at query-region offset 2 * gap_i, so every key is queried exactly once.
- All other positions are 0, or uniform tokens in [0, V) if random_non_queries (they may collide with keys).
- Zoology builds L + 1 tokens (the query region has L - 2n + 1 positions) and returns inputs = tokens[:-1],
  targets = labels[1:]: the target at a query key's position is that key's value, every other target is
  -100. The last token is always filler, so we build the L inputs directly: the same data.
- Randomness: numpy's legacy global generator, np.random.seed(seed) once per data segment; train and test
  segments get disjoint seeds.

We follow the distributions exactly but not Zoology's bit stream: its per-example np.random.choice calls cost
~170 us per example (17 s for 100k examples). Keys/values are drawn by sequential rejection (each new
draw uniform over the unused tokens, the same law as choice without replacement) and gaps by exponential
sorting (Efraimidis-Spirakis: ordering Exp(1)/p_i ascending gives successive sampling without replacement
with weights p, the law of np.random.choice(space, n, replace=False, p=p), order included).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch

from mom_bench.config import ConfigError

IGNORE_INDEX = -100


def check_mqar_params(vocab_size, seq_len, num_kv_pairs, num_examples=1, seed=0, power_a=0.01) -> None:
    """Raise ConfigError, naming the parameter and the constraint, if an MQAR segment cannot be generated."""
    for name, v in (("vocab_size", vocab_size), ("seq_len", seq_len), ("num_kv_pairs", num_kv_pairs),
                    ("num_examples", num_examples), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ConfigError(f"{name} must be an integer, got {v!r}")
    for name, v in (("vocab_size", vocab_size), ("seq_len", seq_len), ("num_kv_pairs", num_kv_pairs)):
        if v <= 0:
            raise ConfigError(f"{name} must be positive, got {v}")
    if num_examples < 1:
        raise ConfigError(f"num_examples must be >= 1, got {num_examples}")
    if not 0 <= seed < 2**32:  # np.random.seed's range
        raise ConfigError(f"seed must be in [0, 2**32), got {seed}")
    if isinstance(power_a, bool) or not isinstance(power_a, numbers.Real) or not (
            math.isfinite(power_a) and power_a > 0):
        raise ConfigError(f"power_a must be a finite number > 0, got {power_a!r}")
    if seq_len % 2:
        raise ConfigError(f"seq_len must be even, got {seq_len}")
    if 4 * num_kv_pairs > seq_len:  # the query region must have at least n slots: (L - 2n) / 2 >= n
        raise ConfigError(f"num_kv_pairs: 4 * num_kv_pairs must be <= seq_len "
                          f"(got num_kv_pairs={num_kv_pairs}, seq_len={seq_len})")
    half = vocab_size // 2
    if min(half - 1, vocab_size - half) < num_kv_pairs:
        raise ConfigError(f"vocab_size: the key range [1, {half}) and the value range [{half}, {vocab_size}) "
                          f"must each hold num_kv_pairs={num_kv_pairs} distinct tokens")
    if vocab_size <= seq_len:
        raise ConfigError(f"vocab_size must be > seq_len (got vocab_size={vocab_size}, seq_len={seq_len})")


def _distinct(num_rows: int, k: int, low: int, high: int) -> np.ndarray:
    """Per row, k distinct uniform ints from [low, high) in random order (= choice without replacement)."""
    out = np.empty((num_rows, k), dtype=np.int64)
    for j in range(k):
        cand = np.random.randint(low, high, size=num_rows)
        # Redraw rows whose candidate is already taken: the accepted draw is uniform over unused tokens.
        bad = np.flatnonzero((out[:, :j] == cand[:, None]).any(1))
        while bad.size:
            cand[bad] = np.random.randint(low, high, size=bad.size)
            bad = bad[(out[bad, :j] == cand[bad, None]).any(1)]
        out[:, j] = cand
    return out


def mqar(vocab_size: int, seq_len: int, num_kv_pairs: int, num_examples: int, seed: int,
         power_a: float = 0.01, random_non_queries: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """One MQAR data segment: (inputs, targets), LongTensors of shape (num_examples, seq_len)."""
    check_mqar_params(vocab_size, seq_len, num_kv_pairs, num_examples, seed, power_a)
    N, L, n, V = num_examples, seq_len, num_kv_pairs, vocab_size
    # The legacy global generator, as the reference; restore its state so that callers' seeding is not
    # disturbed by data generation.
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        keys = _distinct(N, n, 1, V // 2)  # 0 is kept for filler, so it is never a key
        values = _distinct(N, n, V // 2, V)
        space = (L - 2 * n) // 2
        p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
        p /= p.sum()
        gaps = np.empty((N, n), dtype=np.int64)
        for r in range(0, N, 16384):  # row chunks bound the temporaries; the draws are the same stream
            e = np.random.standard_exponential((min(16384, N - r), space))
            e /= p
            gaps[r:r + len(e)] = np.argsort(e, axis=1)[:, :n]
        fill = np.random.randint(0, V, size=(N, L)) if random_non_queries else None
    finally:
        np.random.set_state(saved)

    inputs = np.zeros((N, L), dtype=np.int64)
    inputs[:, 0:2 * n:2] = keys
    inputs[:, 1:2 * n:2] = values
    rows = np.arange(N)[:, None]
    qpos = 2 * n + 2 * gaps  # <= L - 2: every query lies inside the inputs
    inputs[rows, qpos] = keys
    targets = np.full((N, L), IGNORE_INDEX, dtype=np.int64)
    targets[rows, qpos] = values  # predict the value at the position where its key is read
    if fill is not None:
        zero = inputs == 0
        inputs[zero] = fill[zero]
    return torch.from_numpy(inputs), torch.from_numpy(targets)


@dataclass
class MQARSlice:
    seq_len: int
    num_kv_pairs: int
    inputs: torch.Tensor
    targets: torch.Tensor

    @property
    def name(self) -> str:
        return f"L{self.seq_len}_n{self.num_kv_pairs}"


def build_mqar(data_cfg) -> Tuple[List[MQARSlice], List[MQARSlice]]:
    """Train and test slices from a DataConfig (or an OmegaConf node with its fields).

    Train slice i uses seed train_seed + i, test slice j test_seed + j; the two seed sets must be disjoint so
    that no test segment repeats a train segment's random stream.
    """
    segments = check_mqar_data(data_cfg)
    out = {"train": [], "test": []}
    for split, _, s, seed in segments:
        x, y = mqar(data_cfg.vocab_size, s.seq_len, s.num_kv_pairs, s.num_examples, seed,
                    power_a=data_cfg.power_a, random_non_queries=bool(data_cfg.random_non_queries))
        out[split].append(MQARSlice(int(s.seq_len), int(s.num_kv_pairs), x, y))
    return out["train"], out["test"]


def check_mqar_data(data_cfg) -> List[tuple]:
    """Raise ConfigError naming the slice if any slice of a DataConfig cannot be generated; else return
    its (split, index, slice, seed) segments. Part of config validation: nothing is generated here."""
    segments = [("train", i, s, data_cfg.train_seed + i) for i, s in enumerate(data_cfg.train)]
    segments += [("test", j, s, data_cfg.test_seed + j) for j, s in enumerate(data_cfg.test)]
    train_seeds = {seed for split, _, _, seed in segments if split == "train"}
    test_seeds = {seed for split, _, _, seed in segments if split == "test"}
    if train_seeds & test_seeds:
        raise ConfigError(
            f"train_seed/test_seed: train seeds {sorted(train_seeds)} and test seeds {sorted(test_seeds)} "
            f"overlap (train_seed={data_cfg.train_seed}, test_seed={data_cfg.test_seed}); they must be disjoint")
    # Validate everything before generating anything: a bad last slice should not cost minutes of data.
    for split, i, s, seed in segments:
        try:
            check_mqar_params(data_cfg.vocab_size, s.seq_len, s.num_kv_pairs, s.num_examples, seed,
                              data_cfg.power_a)
        except ConfigError as e:
            raise ConfigError(f"data.{split}[{i}]: {e}") from None
    return segments


def query_positions(targets: torch.Tensor) -> torch.Tensor:
    """(N, n) indices of the supervised positions of each row of MQAR targets (N, L): every row has its n
    queries, so a batch can gather them without a host sync (a boolean mask would need one)."""
    mask = targets != IGNORE_INDEX
    counts = mask.sum(1)
    if len(counts) and counts.min() != counts.max():
        raise ValueError(f"rows have {int(counts.min())} to {int(counts.max())} supervised positions; "
                         "query_positions needs the same number in every row")
    return mask.nonzero()[:, 1].view(len(targets), -1)


def accuracy(logits_or_preds: torch.Tensor, targets: torch.Tensor) -> Tuple[int, int]:
    """(correct, total) over positions whose target is not -100; accepts logits (N, L, V) or preds (N, L)."""
    preds = logits_or_preds
    if preds.dim() == targets.dim() + 1:
        preds = preds.argmax(-1)
    if preds.shape != targets.shape:
        raise ValueError(f"predictions of shape {tuple(preds.shape)} do not match targets "
                         f"{tuple(targets.shape)}")
    mask = targets != IGNORE_INDEX
    return int((preds[mask] == targets[mask]).sum()), int(mask.sum())
