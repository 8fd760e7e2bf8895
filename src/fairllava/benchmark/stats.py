"""The one adapter between the benchmark and its statistics: signed gaps, rates, seed pooling, paired effects.

Why one module: the leaderboard must not care how a CI or a p-value is computed, only that the same
function computes it for every method. Everything works on *units* (``group_id`` clusters: a synthetic
patient's images are resampled and permuted together) and on :class:`~fairllava.metrics.base.MetricStats`
(corpus metrics are recomputed on each group from summed statistics).

The signed gap's paired effect and the false-positive-rate metric are :mod:`fairllava.fairness`'s own
(``pool_paired``, ``rate_metric``); the rest is pooled with the same random-effects estimator.

- per seed, a quantity ``q`` of a metric: ``overall``, ``group:<g>``, ``signed_gap`` (advantaged − disadvantaged;
  disadvantaged − advantaged for error rates, so > 0 always means the disadvantaged group is worse off), ``es``;
- pooled over seeds: the mean of the per-seed values, with a random-effects SE (between-seed variance by
  moments plus each seed's unit-bootstrap variance, stratified by group); normal CI and p;
- paired effect of a method vs the baseline: mean over seeds of ``q(method) − q(baseline)`` on the same test
  samples; for the signed gap via ``fairness.pool_paired`` (paired permutation per seed), else a paired
  unit bootstrap per seed, pooled the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import FairllavaError
from ..io import read_jsonl, stable_hash

SIGNATURE = "signature_fpr"


def _rng(seed: int, *key) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(stable_hash(*key),)))


# ---------------------------------------------------------------------------------------------- per-seed data


# The answer each task's shortcut gives the minority (benchmark/derm.py, benchmark/cxr.py). Fixed per task, so the
# S = 0 control measures the same label's false-positive rate as S = 1: at S = 0 the training probabilities are
# balanced and carry no hint of which label that is.
SHORTCUT_LABEL = {"derm-vqa": "MEL", "cxr-report": "abnormal"}


def shortcut_target(card: dict, task: Optional[str] = None) -> str:
    """The label the shortcut favours for the minority: the task's own (checked against the datacard when the
    datacard shows an enrichment); for another task, the label the minority is most enriched for in training."""
    sc = card["shortcut"]
    minority, majority = sc["train_minority_label_probs"], sc.get("train_majority_label_probs") or {}
    excess = {k: v - majority.get(k, 0.0 if majority else 1.0 / len(minority)) for k, v in minority.items()}
    enriched = max(excess, key=excess.get)
    if task not in SHORTCUT_LABEL:
        return enriched
    target = SHORTCUT_LABEL[task]
    if excess[enriched] > 1e-6 and enriched != target:
        raise FairllavaError(f"{task} datacard: the minority is enriched for {enriched!r} in training, but the task's "
                             f"shortcut label is {target!r}; the renderer and SHORTCUT_LABEL disagree")
    return target


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
    target = shortcut_target(card, task)
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
    attribute: str = ""

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
    from ..fairness import rate_metric

    out[SIGNATURE] = rate_metric(predicted_labels([r["prediction"] for r in rows], card, task), labels,
                                 shortcut_target(card, task))
    seen: dict = {}
    clusters = np.array([seen.setdefault(groups[str(r["id"])], len(seen)) for r in rows], dtype=np.int64)
    values = [(r.get("attributes") or {}).get(attribute) for r in rows]
    return SeedData(seed, [str(r["id"]) for r in rows], values, labels, clusters, out, attribute)


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

    def ones(self) -> np.ndarray:
        return np.ones((1, len(self.n)))

    def strata(self) -> list[np.ndarray]:
        rest = 1.0 - np.maximum(self.adv, self.dis)
        return [np.flatnonzero(m) for m in (self.adv, self.dis, rest) if m.any()]


def _boot(q: _Quantity, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    from ..fairness.bootstrap import iter_resample_weights

    return np.concatenate([q(W) for W in iter_resample_weights(len(q.n), n_boot, rng, q.strata())])


def _random_effects(values: Sequence[float], variances: Optional[Sequence[float]], level: float) -> dict:
    """Mean over seeds with the random-effects SE of ``fairness.pool_paired`` (independent seeds: a diagonal
    sampling covariance; ``τ²`` by moments, ``SE² = τ²/S + Σ σ_s² / S²``), but a **normal** CI and two-sided p
    for 0, as protocol §6 declares for per-system values (the paired test keeps its t reference)."""
    from scipy.stats import norm

    from ..fairness.pooling import random_effects

    v = np.asarray(values, dtype=np.float64)
    out = {"value": _f(np.mean(v)) if v.size else None, "ci": None, "se": None, "tau2": None, "p_value": None}
    if variances is None or not v.size or not np.all(np.isfinite(v)):
        return out
    var = np.asarray(variances, dtype=np.float64)
    if not np.all(np.isfinite(var)):
        return out
    res = random_effects(v, np.diag(var), level, shared=False)
    mean, se, tau2 = float(v.mean()), float(res["se"]), float(res["tau2"])
    z = float(norm.ppf((1 + level) / 2))
    out.update(ci=[mean - z * se, mean + z * se], se=se, tau2=tau2,
               p_value=_f(2 * norm.sf(abs(mean) / se)) if se > 0 else None)
    return out


def _f(x) -> Optional[float]:
    x = float(x)
    return x if np.isfinite(x) else None


POOLING = ("mean over seeds; CI and p from a random-effects SE (between-seed variance by moments + each seed's "
           "unit-bootstrap variance), normal reference")


def pooled(seeds: Sequence[SeedData], metric: str, quantity: str, direction: tuple[str, str], *, n_boot: int,
           seed: int = 0, level: float = 0.95, key: str = "") -> dict:
    """``quantity`` of one system pooled over seeds (see :data:`POOLING`); p-value only for ``signed_gap``."""
    qs = [_Quantity(sd, metric, quantity, *direction) for sd in seeds]
    per_seed = [float(q(q.ones())[0]) for q in qs]
    var, reps = None, []
    if n_boot >= 2:
        reps = [_boot(q, n_boot, _rng(seed, key, metric, quantity, "boot", sd.seed)) for q, sd in zip(qs, seeds)]
        var = [float(np.nanvar(r, ddof=1)) for r in reps]
    out = _random_effects(per_seed, var, level)
    if len(seeds) == 1 and reps:  # one seed: no between-seed part; the bootstrap's own percentile interval
        r = reps[0][np.isfinite(reps[0])]
        if r.size >= 2:
            out["ci"] = [float(np.quantile(r, (1 - level) / 2)), float(np.quantile(r, (1 + level) / 2))]
    if quantity != "signed_gap":
        out["p_value"] = None
    return {**out, "per_seed": [_f(v) for v in per_seed], "seeds": [sd.seed for sd in seeds]}


def paired_effect(base: Sequence[SeedData], method: Sequence[SeedData], metric: str, quantity: str,
                  direction: tuple[str, str], *, n_boot: int, n_perm: int, seed: int = 0, level: float = 0.95,
                  key: str = "") -> dict:
    """Mean over seeds of ``q(method) − q(base)`` on the same samples (paired), with CI and two-sided p.

    ``signed_gap`` goes through :func:`fairllava.fairness.pool_paired` (paired unit bootstrap, paired permutation
    per seed, random-effects pooling); other quantities use the same pooling on a paired unit bootstrap.
    """
    if [b.seed for b in base] != [m.seed for m in method]:
        raise FairllavaError(f"paired effect: seeds differ ({[b.seed for b in base]} vs {[m.seed for m in method]})")
    for b, m in zip(base, method):
        if b.ids != m.ids:
            raise FairllavaError(f"seed {b.seed}: baseline and method predictions cover different ids")
    if quantity == "signed_gap" and n_boot >= 2:
        from ..fairness import Direction, SeedPair, pool_paired

        d = Direction(base[0].attribute or "attribute", direction[0], direction[1], "datacard")
        pairs = [SeedPair(b.metrics[metric], m.metrics[metric], b.values, b.clusters.tolist(), b.labels, b.ids,
                          name=f"seed{b.seed}") for b, m in zip(base, method)]
        res = pool_paired(pairs, d, n_boot=n_boot, n_perm=n_perm, seed=seed, level=level, run=f"{key}:{metric}")
        pl = res["pooled"]
        return {"value": None if pl["diff"] is None else -pl["diff"],
                "ci": None if pl["ci"] is None else [-pl["ci"][1], -pl["ci"][0]], "se": pl["se"], "tau2": pl["tau2"],
                "p_value": pl["p_two_sided"], "per_seed": [None if r["diff"] is None else -r["diff"]
                                                          for r in res["per_seed"]],
                "per_seed_p": [r["p_two_sided"] for r in res["per_seed"]], "seeds": [b.seed for b in base],
                "statistic": "fairllava.fairness.pool_paired (sign flipped: method − baseline)"}
    diffs, var = [], [] if n_boot >= 2 else None
    for b, m in zip(base, method):
        qb, qm = _Quantity(b, metric, quantity, *direction), _Quantity(m, metric, quantity, *direction)
        diffs.append(float(qm(qm.ones())[0] - qb(qb.ones())[0]))
        if var is not None:
            from ..fairness.bootstrap import iter_resample_weights

            rng = _rng(seed, key, metric, quantity, "paired-boot", b.seed)
            reps = np.concatenate([qm(W) - qb(W) for W in iter_resample_weights(len(qb.n), n_boot, rng, qb.strata())])
            var.append(float(np.nanvar(reps, ddof=1)))
    return {**_random_effects(diffs, var, level), "per_seed": [_f(d) for d in diffs],
            "seeds": [b.seed for b in base], "statistic": POOLING}


def holm(pvalues: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm-adjusted p-values over one family (None entries stay None)."""
    from ..fairness import holm as _holm

    return _holm(list(pvalues))
