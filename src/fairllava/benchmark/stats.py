"""The one adapter between the benchmark and its statistics: signed gaps, rates, seed pooling, paired effects.

Why one module: the leaderboard must not care how a CI or a p-value is computed, only that the same
function computes it for every method. Everything works on *units* (``group_id`` clusters: a synthetic
patient's images are resampled and permuted together) and on :class:`~fairllava.metrics.base.MetricStats`
(corpus metrics are recomputed on each group from summed statistics).

- per seed, a quantity ``q`` of a metric: ``overall``, ``group:<g>``, ``signed_gap`` (advantaged − disadvantaged;
  disadvantaged − advantaged for error rates, so > 0 always means the disadvantaged group is worse off), ``es``;
- pooled over seeds: the mean of the per-seed values; CI from a two-level bootstrap (seeds drawn with
  replacement, then units within each drawn seed, stratified by group); a pooled permutation p-value;
- paired effect of a method vs the baseline: mean over seeds of ``q(method) − q(baseline)`` on the same test
  samples, CI from the two-level paired bootstrap, p from swapping the two systems' outputs per unit (sign flip).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import FairllavaError
from ..io import read_jsonl, stable_hash
from ..metrics.base import MetricStats

SIGNATURE = "signature_fpr"


def _rng(seed: int, *key) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(stable_hash(*key),)))


# ---------------------------------------------------------------------------------------------- per-seed data


def _rate_reduce(sums: np.ndarray, n: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sums[..., 1] > 0, 100.0 * sums[..., 0] / np.where(sums[..., 1] > 0, sums[..., 1], 1), np.nan)


def rate_metric(predicted: Sequence[str], true: Sequence[str], label: str) -> MetricStats:
    """False-positive rate of ``label`` in percent: among samples whose true label is not ``label``, the share
    answered ``label`` (an error rate: lower is better)."""
    elig = np.array([t != label for t in true], dtype=np.float64)
    hit = np.array([p == label for p in predicted], dtype=np.float64) * elig
    return MetricStats(SIGNATURE, np.stack([hit, elig], 1), _rate_reduce, "rate", None,
                       {"higher_is_better": False, "label": label, "scale": "percent"})


def shortcut_target(card: dict) -> str:
    """The label the minority is enriched for in training (the shortcut's answer)."""
    probs = card["shortcut"]["train_minority_label_probs"]
    return max(probs, key=probs.get)


def predicted_labels(predictions: Sequence[str], card: dict, task: str) -> list[str]:
    """derm: the parsed answer; cxr: ``abnormal`` when the rule-based labeler finds any pathology."""
    if task == "derm-vqa":
        from ..metrics.vqa import LabelSet, parse_labels

        return parse_labels(list(predictions), LabelSet.ham(list(card["labels"])))
    from ..metrics.chexpert_rules import CONDITIONS, label_reports

    nf = CONDITIONS.index("No Finding")
    lab = label_reports(list(predictions))
    return ["normal" if lab[i, nf] == 1 else "abnormal" for i in range(len(predictions))]


def shortcut_signature(preds_path: str | Path, card: dict, task: str = "derm-vqa") -> dict:
    """Per group: percent of test samples *without* the shortcut label that were answered with it.

    Why: the shortcut makes the model give the answer the minority is enriched for in training; the damage is
    in this false-positive rate, which the accuracy gap dilutes. Without a shortcut the groups' rates agree.
    """
    sc = card["shortcut"]
    target = shortcut_target(card)
    rows = read_jsonl(preds_path)
    pred = predicted_labels([r["prediction"] for r in rows], card, task)
    out = {"label": target, "attribute": sc["attribute"], "groups": {}}
    for g in sorted({r["attributes"][sc["attribute"]] for r in rows}):
        neg = [p for r, p in zip(rows, pred) if r["attributes"][sc["attribute"]] == g and r["label"] != target]
        out["groups"][g] = {"n": len(neg), "false_positive_pct": 100.0 * sum(p == target for p in neg) / max(len(neg), 1)}
    return out


@dataclass
class SeedData:
    """One seed's evaluated predictions, reduced to what the statistics need (rows in file order)."""

    seed: int
    ids: list
    values: list  # the shortcut attribute's value per sample
    labels: list  # task label per sample
    clusters: np.ndarray  # unit index per sample (group_id, order of first appearance)
    metrics: dict  # name -> MetricStats

    def units(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-unit summed statistics ``[U, K]`` and sample counts ``[U]``."""
        ms = self.metrics[metric]
        U = int(self.clusters.max()) + 1
        S = np.zeros((U, ms.stats.shape[1]))
        np.add.at(S, self.clusters, ms.stats)
        return S, np.bincount(self.clusters, minlength=U).astype(np.float64)

    def unit_values(self) -> list:
        U = int(self.clusters.max()) + 1
        out: list = [None] * U
        for c, v in zip(self.clusters, self.values):
            out[c] = v
        return out

    def unit_strata(self) -> np.ndarray:
        """Permutation strata: units with the same multiset of task labels."""
        U = int(self.clusters.max()) + 1
        labs: list[list] = [[] for _ in range(U)]
        for c, y in zip(self.clusters, self.labels):
            labs[c].append(str(y))
        keys = {}
        return np.array([keys.setdefault(tuple(sorted(x)), len(keys)) for x in labs], dtype=np.int64)


def load_seed(preds_path: str | Path, records_path: str | Path, card: dict, task: str, attribute: str,
              metrics: Sequence[str], seed: int) -> SeedData:
    """Recompute the requested metrics (+ the shortcut signature) from a run's predictions file."""
    from ..fairness.evaluate import build_metrics, load_predictions
    from .plan import EVAL_TASK

    rows = read_jsonl(preds_path)
    groups = {str(r["id"]): str(r.get("group_id") or r["id"]) for r in read_jsonl(records_path)}
    missing = [str(r["id"]) for r in rows if str(r["id"]) not in groups]
    if missing:
        raise FairllavaError(f"{preds_path} (id={missing[0]}): not in {records_path}")
    data = load_predictions(rows, EVAL_TASK[task])
    wanted = sorted({"keyword_f1" if m.startswith("keyword_f1_") else m for m in metrics if m != SIGNATURE})
    built, _, _ = build_metrics(data, EVAL_TASK[task], metrics=wanted,
                                labels=card["labels"] if EVAL_TASK[task] == "vqa" else None)
    out = {m: built[m] for m in metrics if m != SIGNATURE}
    labels = [str(r.get("label")) for r in rows]
    out[SIGNATURE] = rate_metric(predicted_labels([r["prediction"] for r in rows], card, task), labels,
                                 shortcut_target(card))
    seen: dict = {}
    clusters = np.array([seen.setdefault(groups[str(r["id"])], len(seen)) for r in rows], dtype=np.int64)
    values = [(r.get("attributes") or {}).get(attribute) for r in rows]
    return SeedData(seed, [str(r["id"]) for r in rows], values, labels, clusters, out)


# ---------------------------------------------------------------------------------------------- quantities


class _Quantity:
    """``q(W)`` for unit weights ``W[B, U]`` of one metric on one seed (vectorised over resamples)."""

    def __init__(self, sd: SeedData, metric: str, quantity: str, advantaged: str, disadvantaged: str):
        self.ms = sd.metrics[metric]
        self.S, self.n = sd.units(metric)
        vals = sd.unit_values()
        self.adv = np.array([v == advantaged for v in vals], dtype=np.float64)
        self.dis = np.array([v == disadvantaged for v in vals], dtype=np.float64)
        if not self.adv.any() or not self.dis.any():
            raise FairllavaError(f"seed {sd.seed}: groups {advantaged!r} and {disadvantaged!r} must both be present")
        self.sign = 1.0 if self.ms.meta.get("higher_is_better", True) else -1.0
        self.quantity = quantity
        if quantity.startswith("group:"):
            g = quantity[len("group:"):]
            self.mask = np.array([v == g for v in vals], dtype=np.float64)

    def _combine(self, m) -> np.ndarray:
        """The quantity from ``m(mask)`` = metric values of the units selected by ``mask`` (None = all)."""
        q = self.quantity
        if q == "overall":
            return m(None)
        if q.startswith("group:"):
            return m(self.mask)
        gap = self.sign * (m(self.adv) - m(self.dis))
        if q == "signed_gap":
            return gap
        if q == "es":
            return m(None) / (1.0 + np.abs(gap))
        raise ValueError(f"unknown quantity {q!r}")

    def __call__(self, W: np.ndarray) -> np.ndarray:
        """Values for unit multiplicities ``W[B, U]``."""
        def m(mask):
            Wm = W if mask is None else W * mask
            return self.ms.reduce(Wm @ self.S, Wm @ self.n)

        return self._combine(m)

    def swapped(self, other: "_Quantity", M: np.ndarray) -> np.ndarray:
        """Values for systems that take ``other``'s unit where ``M[P, U]`` = 1 and this one's elsewhere."""
        def m(mask):
            mk = np.ones(len(self.n)) if mask is None else mask
            sums = ((1.0 - M) * mk) @ self.S + (M * mk) @ other.S
            return self.ms.reduce(sums, np.full(M.shape[0], mk @ self.n))

        return self._combine(m)

    def ones(self) -> np.ndarray:
        return np.ones((1, len(self.n)))

    def strata(self) -> list[np.ndarray]:
        rest = 1.0 - np.maximum(self.adv, self.dis)
        return [np.flatnonzero(m) for m in (self.adv, self.dis, rest) if m.any()]


def _boot(q: _Quantity, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    from ..fairness.bootstrap import iter_resample_weights

    return np.concatenate([q(W) for W in iter_resample_weights(len(q.n), n_boot, rng, q.strata())])


def _pool(reps: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Two-level replicates: seeds drawn with replacement, each contributing an independent unit-level replicate."""
    R = np.stack(reps)  # [k, B]
    k, B = R.shape
    if k == 1:
        return R[0]
    J = rng.integers(k, size=(B, k))
    I = rng.integers(B, size=(B, k))
    return np.nanmean(R[J, I], axis=1)


def _ci(reps: np.ndarray, level: float) -> Optional[list]:
    reps = reps[np.isfinite(reps)]
    if reps.size < 2:
        return None
    a = (1 - level) / 2
    return [float(np.quantile(reps, a)), float(np.quantile(reps, 1 - a))]


def _p_two_sided(observed: float, null: np.ndarray) -> Optional[float]:
    null = null[np.isfinite(null)]
    if not np.isfinite(observed) or null.size == 0:
        return None
    return float((1 + np.sum(np.abs(null) >= abs(observed) - 1e-12)) / (1 + null.size))


def _f(x) -> Optional[float]:
    x = float(x)
    return x if np.isfinite(x) else None


def pooled(seeds: Sequence[SeedData], metric: str, quantity: str, direction: tuple[str, str], *, n_boot: int,
           n_perm: int = 0, seed: int = 0, level: float = 0.95, key: str = "") -> dict:
    """Mean over seeds of ``quantity`` with a two-level bootstrap CI; for ``signed_gap`` also a pooled
    permutation p-value (group labels permuted among units within label strata, in every seed)."""
    qs = [_Quantity(sd, metric, quantity, *direction) for sd in seeds]
    per_seed = [float(q(q.ones())[0]) for q in qs]
    value = float(np.nanmean(per_seed)) if per_seed else float("nan")
    out = {"value": _f(value), "ci": None, "p_value": None, "per_seed": [_f(v) for v in per_seed],
           "seeds": [sd.seed for sd in seeds]}
    if n_boot:
        reps = [_boot(q, n_boot, _rng(seed, key, metric, quantity, "boot", sd.seed)) for q, sd in zip(qs, seeds)]
        out["ci"] = _ci(_pool(reps, _rng(seed, key, metric, quantity, "pool")), level)
    if n_perm and quantity == "signed_gap":
        null = np.mean([_perm_gap(q, sd, n_perm, _rng(seed, key, metric, "perm", sd.seed)) for q, sd in zip(qs, seeds)], 0)
        out["p_value"] = _p_two_sided(value, null)
    return out


def _perm_gap(q: _Quantity, sd: SeedData, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    strata = sd.unit_strata()
    adv0, dis0 = q.adv.copy(), q.dis.copy()
    both = np.flatnonzero((adv0 + dis0) > 0)
    out = np.empty(n_perm)
    for p in range(n_perm):
        adv, dis = adv0.copy(), dis0.copy()
        for s in np.unique(strata[both]):
            idx = both[strata[both] == s]
            perm = rng.permutation(idx)
            adv[idx], dis[idx] = adv0[perm], dis0[perm]
        q.adv, q.dis = adv, dis
        out[p] = q(q.ones())[0]
    q.adv, q.dis = adv0, dis0
    return out


def paired_effect(base: Sequence[SeedData], method: Sequence[SeedData], metric: str, quantity: str,
                  direction: tuple[str, str], *, n_boot: int, n_perm: int, seed: int = 0, level: float = 0.95,
                  key: str = "") -> dict:
    """Mean over seeds of ``q(method) − q(base)`` on the same samples, paired CI and sign-flip p-value."""
    if [b.seed for b in base] != [m.seed for m in method]:
        raise FairllavaError(f"paired effect: seeds differ ({[b.seed for b in base]} vs {[m.seed for m in method]})")
    diffs, reps, nulls = [], [], []
    for b, m in zip(base, method):
        if b.ids != m.ids:
            raise FairllavaError(f"seed {b.seed}: baseline and method predictions cover different ids")
        qb, qm = _Quantity(b, metric, quantity, *direction), _Quantity(m, metric, quantity, *direction)
        diffs.append(float(qm(qm.ones())[0] - qb(qb.ones())[0]))
        if n_boot:
            rng = _rng(seed, key, metric, quantity, "paired-boot", b.seed)
            from ..fairness.bootstrap import iter_resample_weights

            reps.append(np.concatenate([qm(W) - qb(W) for W in
                                        iter_resample_weights(len(qb.n), n_boot, rng, qb.strata())]))
        if n_perm:
            rng = _rng(seed, key, metric, quantity, "paired-perm", b.seed)
            M = (rng.random((n_perm, len(qb.n))) < 0.5).astype(np.float64)
            qa, qc = qb.swapped(qm, M), qb.swapped(qm, 1.0 - M)  # the two systems after per-unit swaps
            nulls.append(qc - qa)
    value = float(np.mean(diffs))
    out = {"value": _f(value), "ci": None, "p_value": None, "per_seed": [_f(d) for d in diffs],
           "seeds": [b.seed for b in base]}
    if n_boot:
        out["ci"] = _ci(_pool(reps, _rng(seed, key, metric, quantity, "paired-pool")), level)
    if n_perm:
        out["p_value"] = _p_two_sided(value, np.mean(nulls, axis=0))
    return out


def holm(pvalues: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm-adjusted p-values over one family (None entries stay None)."""
    from ..fairness import holm as _holm

    return _holm(list(pvalues))
