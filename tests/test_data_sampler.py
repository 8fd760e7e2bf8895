from collections import Counter

import numpy as np
import pytest

from fairllava.data.attributes import IGNORE_INDEX
from fairllava.data.sampler import AttributeBalancedBatchSampler, LengthGroupedSampler, reweight_weights


def _labels(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    age = rng.choice(3, n, p=[0.7, 0.2, 0.1])
    race = rng.choice(8, n, p=[0.6, 0.15, 0.08, 0.07, 0.05, 0.02, 0.01, 0.02])
    sex = rng.choice(2, n, p=[0.8, 0.2])
    sex[:50] = IGNORE_INDEX  # missing sex for 50 samples
    return {"sex": sex.tolist(), "age_group": age.tolist(), "race": race.tolist()}


def test_round_robin_balance_and_order():
    lab = _labels()
    s = AttributeBalancedBatchSampler(lab, batch_size=16, seed=3)
    assert s.order == ["age_group", "race", "sex"] and len(s) == 1000 // 16
    for t, batch in enumerate(s):
        assert len(batch) == 16
        a = s.order[t % 3]
        counts = Counter(lab[a][i] for i in batch)
        assert IGNORE_INDEX not in counts  # missing labels never drawn for the balanced attribute
        k = {"age_group": 3, "race": 8, "sex": 2}[a]
        assert set(counts) == set(range(k))
        assert max(counts.values()) - min(counts.values()) <= 1  # floor(B/K) each, remainder spread
        assert sorted(counts.values()) == sorted([16 // k + (1 if j < 16 % k else 0) for j in range(k)])


def test_cycles_and_reshuffles_small_groups():
    lab = {"sex": [0] * 98 + [1, 1]}
    s = AttributeBalancedBatchSampler(lab, batch_size=10)
    drawn = [i for b in s for i in b if lab["sex"][i] == 1]
    assert len(drawn) == 5 * len(s) and set(drawn) == {98, 99}  # small group cycled


def test_deterministic_given_seed_and_epoch():
    lab = _labels()
    a = AttributeBalancedBatchSampler(lab, 8, seed=1)
    b = AttributeBalancedBatchSampler(lab, 8, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    c = AttributeBalancedBatchSampler(lab, 8, seed=2)
    assert list(c) != first


def test_distributed_ranks_are_balanced_and_disjoint():
    lab = _labels()
    r0 = AttributeBalancedBatchSampler(lab, 9, seed=0, rank=0, world_size=2, order=["age_group"])
    r1 = AttributeBalancedBatchSampler(lab, 9, seed=0, rank=1, world_size=2, order=["age_group"])
    assert len(r0) == len(r1) == 1000 // 18
    for b0, b1 in zip(r0, r1):
        assert len(b0) == len(b1) == 9
        for b in (b0, b1):
            assert sorted(Counter(lab["age_group"][i] for i in b).values()) == [3, 3, 3]
    with pytest.raises(ValueError):
        AttributeBalancedBatchSampler(lab, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="order"):
        AttributeBalancedBatchSampler(lab, 4, order=["site"])


def test_length_grouped_sampler():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, 403).tolist()
    s = LengthGroupedSampler(lengths, batch_size=4, seed=0)
    idx = list(s)
    assert sorted(idx) == list(range(403))
    spread = np.mean([np.ptp([lengths[i] for i in idx[j:j + 4]]) for j in range(0, 400, 4)])
    rand = np.mean([np.ptp(rng.choice(lengths, 4)) for _ in range(100)])
    assert spread < rand / 3
    assert list(LengthGroupedSampler(lengths, 4, seed=0)) == idx
    r = [list(LengthGroupedSampler(lengths, 4, seed=0, rank=k, world_size=2)) for k in range(2)]
    assert len(r[0]) == len(r[1]) == 202 and len(set(r[0]) | set(r[1])) == 403


def _recs(cells):
    return [{"id": f"s{i}", "attributes": {"sex": s, "age_group": a}} for i, (s, a) in enumerate(cells)]


def test_reweight_intersectional_and_product():
    cells = [("M", "0-44")] * 6 + [("F", "0-44")] * 3 + [("F", "66+")]
    w = reweight_weights(_recs(cells), ["sex", "age_group"])
    assert np.isclose(np.mean(list(w.values())), 1.0)
    # inverse frequency: 1/6, 1/3, 1 normalised by their mean (=0.3)
    assert np.isclose(w["s0"], (1 / 6) / 0.3) and np.isclose(w["s6"], (1 / 3) / 0.3) and np.isclose(w["s9"], 1 / 0.3)
    # each cell then carries equal total weight
    assert np.isclose(6 * w["s0"], 3 * w["s6"]) and np.isclose(3 * w["s6"], w["s9"])
    p = reweight_weights(_recs(cells), ["sex", "age_group"], mode="product")
    raw = {"s0": 1 / 6 * 1 / 9, "s6": 1 / 4 * 1 / 9, "s9": 1 / 4 * 1}
    mean = (6 * raw["s0"] + 3 * raw["s6"] + raw["s9"]) / 10
    assert all(np.isclose(p[k], v / mean) for k, v in raw.items())


def test_reweight_clip_and_missing():
    cells = [("M", "0-44")] * 200 + [("F", None)]
    w = reweight_weights(_recs(cells), ["sex", "age_group"], clip=(0.1, 10))
    assert w["s200"] == 10.0 and w["s0"] >= 0.1
    with pytest.raises(ValueError):
        reweight_weights(_recs(cells), ["sex"], mode="nope")
