"""Pooling paired comparisons over training seeds: per-seed table, pooled mean difference, CI and p-value.

Why: one seed of 150 samples per group detects a gap change of 8 points less than half the time; five seeds
pooled detect it most of the time. The pooled effect is the mean over seeds of ``d_s = Δs_base − Δs_method``.
Its uncertainty has two parts, and both are estimated (a random-effects estimate, documented in
docs/evaluation.md):

- sampling: the covariance ``Σ`` of the ``d_s`` from a joint paired bootstrap; when the seeds were evaluated on
  the same samples (the usual case) one draw of units is shared by all seeds, so the test set's own luck,
  common to every seed, is counted once and not averaged away;
- between seeds: ``τ²`` by the method of moments, ``E[Σ_s (d_s − d̄)²] = (S − 1) τ² + tr Σ − 1ᵀΣ1 / S``
  (clipped at 0).

``SE² = τ² / S + 1ᵀΣ1 / S²``; CI ``d̄ ± t SE`` and one-sided p for d̄ > 0 from Student t with Satterthwaite
degrees of freedom (the between-seed sum of squares has S − 1 df, the shared sampling covariance is taken as
known; normal when τ² = 0).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import FairllavaError
from ..metrics.base import MetricStats
from .bootstrap import iter_resample_weights
from .paired import paired_signed_gap, paired_summary, swap_null
from .signed import Direction, GapEngine, _f, as_direction, as_metric, check_direction, stream
from .units import build_units


@dataclass
class SeedPair:
    """One seed's baseline and method scores on the same samples (same order)."""

    baseline: MetricStats | Sequence[float]
    method: MetricStats | Sequence[float]
    values: Sequence[str | None]
    clusters: Sequence | None = None
    labels: Sequence | None = None
    ids: Sequence[str] | None = None
    name: str = ""


def pool_paired(pairs: Sequence[SeedPair], direction: Direction | str, *, n_boot: int = 1000, n_perm: int = 1000,
                seed: int = 0, level: float = 0.95, ci_method: str = "bca", run: str = "fairllava") -> dict:
    """Per-seed paired signed-gap differences and their random-effects pooled mean (see module docstring)."""
    if not pairs:
        raise FairllavaError("pairs: expected at least one (baseline, method) pair")
    if n_boot < 2:
        raise FairllavaError(f"n_boot={n_boot}: pooling seeds needs n_boot >= 2 (the sampling covariance comes from the "
                             "bootstrap)")
    d = as_direction(direction)
    names = [p.name or f"seed{k + 1}" for k, p in enumerate(pairs)]
    shared = _shared_samples(pairs)
    if shared:
        rows, R = _joint(pairs, names, d, n_boot, n_perm, seed, level, ci_method, run)
    else:
        rows, cols = [], []
        for name, p in zip(names, pairs):
            r = paired_signed_gap(p.baseline, p.method, p.values, d, clusters=p.clusters, labels=p.labels,
                                  n_boot=n_boot, n_perm=n_perm, seed=seed, level=level, ci_method=ci_method,
                                  run=f"{run}:{name}", replicates=True)
            cols.append(r.pop("_replicates"))
            rows.append({"seed": name, **r})
        R = np.stack(cols, 1)
    D = np.array([r["diff"] for r in rows], dtype=np.float64)
    ok = np.all(np.isfinite(R), axis=1)
    S = len(D)
    Sigma = np.atleast_2d(np.cov(R[ok], rowvar=False)) if ok.sum() > 2 else np.full((S, S), np.nan)
    if not shared:
        Sigma = np.diag(np.diag(Sigma))  # independent draws: the off-diagonal is noise around 0
    return {"attribute": d.attribute, "advantaged": d.advantaged, "disadvantaged": d.disadvantaged,
            "direction_source": d.source, "per_seed": rows, "pooled": random_effects(D, Sigma, level, shared)}


def random_effects(D: np.ndarray, Sigma: np.ndarray, level: float = 0.95, shared: bool = True) -> dict:
    """Pooled mean of per-seed differences ``D`` with sampling covariance ``Sigma`` (module docstring).

    Reference distribution: Student t with Satterthwaite degrees of freedom. With ``τ² > 0`` the variance is
    ``Q / (S (S − 1)) + κ``: the between-seed sum of squares ``Q`` (``S − 1`` df) plus the sampling covariance ``κ``
    every seed shares (known from the bootstrap), so ``df = (S − 1) (SE² S (S − 1) / Q)²``; with ``τ² = 0`` the
    bootstrap variance alone (normal). A between-seed spread seen in a handful of seeds thus widens the interval.
    """
    from scipy.special import ndtr, ndtri, stdtr, stdtrit

    S = len(D)
    mean = float(D.mean())
    one = np.ones(S)
    samp = float(one @ Sigma @ one) / S ** 2
    tau2 = 0.0
    if S > 1:
        Q = float(np.sum((D - mean) ** 2))
        tau2 = max(0.0, (Q - float(np.trace(Sigma)) + float(one @ Sigma @ one) / S) / (S - 1))
    se2 = tau2 / S + samp
    se = float(np.sqrt(se2)) if np.isfinite(se2) else float("nan")
    # When tau^2 > 0, SE^2 = Q / (S (S - 1)) + kappa with kappa (the sampling covariance the seeds share) known
    # from the bootstrap and Q ~ chi^2 with S - 1 df, so Satterthwaite gives df = (S - 1) (SE^2 / X)^2.
    X = float(np.sum((D - mean) ** 2)) / (S * (S - 1)) if S > 1 else 0.0
    df = float("inf") if tau2 == 0 or X <= 0 else (S - 1) * (se2 / X) ** 2
    if np.isfinite(se) and se > 0:
        t = mean / se
        if np.isinf(df):
            p1, q = float(ndtr(-t)), float(ndtri((1 + level) / 2))
        else:
            p1, q = float(stdtr(df, -t)), float(stdtrit(df, (1 + level) / 2))
        ci, p2 = [mean - q * se, mean + q * se], min(1.0, 2 * min(p1, 1 - p1))
    else:
        ci = p1 = p2 = None
    return {"diff": _f(mean), "ci": ci, "se": _f(se), "tau2": _f(tau2), "sampling_var": _f(samp),
            "df": None if np.isinf(df) else df,  # None: normal reference (tau^2 = 0)
            "n_seeds": S, "p_value": p1, "p_two_sided": p2, "shared_samples": shared,
            "method": "random effects: mean of per-seed d; SE^2 = tau^2/S + 1'Σ1/S^2 with Σ from a joint paired "
                      "bootstrap (one unit draw shared by all seeds when they are the same samples) and tau^2 by "
                      "moments; Student t with Satterthwaite df (S-1)(SE^2/X)^2, X = Q/(S(S-1)) (normal when tau^2 = 0); "
                      "H1: method has the "
                      "smaller signed gap"}


def _shared_samples(pairs: Sequence[SeedPair]) -> bool:
    first = pairs[0]
    if first.ids is None:
        return False
    for p in pairs[1:]:
        if p.ids is None or list(p.ids) != list(first.ids) or list(p.values) != list(first.values):
            return False
        if (p.clusters is None) != (first.clusters is None) or (
                p.clusters is not None and list(p.clusters) != list(first.clusters)):
            return False
    return True


def _joint(pairs: Sequence[SeedPair], names: list[str], d: Direction, n_boot: int, n_perm: int, seed: int,
           level: float, ci_method: str, run: str) -> tuple[list[dict], np.ndarray]:
    """Per-seed rows and ``[B, S]`` replicates of every seed's d under one shared draw of units per replicate."""
    p0 = pairs[0]
    check_direction(d, list(p0.values), "pool_paired")
    units = build_units(p0.values, [d.advantaged, d.disadvantaged], p0.clusters, p0.labels)
    engines = [(GapEngine(as_metric(p.baseline), units), GapEngine(as_metric(p.method), units)) for p in pairs]
    rng = stream(seed, run, "pooled", d.attribute, d.advantaged, d.disadvantaged)
    flat = [e for pair in engines for e in pair]
    edges = np.cumsum([0] + [e.S.shape[1] for e in flat])
    S_all = np.hstack([e.S for e in flat])  # one product per block for every seed and system
    adv, n = flat[0].adv, flat[0].n
    reps: list[list[np.ndarray]] = [[] for _ in flat]
    for W in iter_resample_weights(units.n_units, n_boot, rng, [units.members(0), units.members(1)]):
        A, Dm = W * adv, W * (1.0 - adv)
        SA, SD, nA, nD = A @ S_all, Dm @ S_all, A @ n, Dm @ n
        for k, e in enumerate(flat):
            sl = slice(edges[k], edges[k + 1])
            reps[k].append(e.sign * (e.reduce(SA[:, sl], nA) - e.reduce(SD[:, sl], nD)))
    rows, cols = [], []
    for k, (name, (ea, eb)) in enumerate(zip(names, engines)):
        a, b = np.concatenate(reps[2 * k]), np.concatenate(reps[2 * k + 1])
        null = swap_null(ea, eb, n_perm, stream(seed, run, name, "perm", d.attribute)) if n_perm else None
        rows.append({"seed": name, **paired_summary(d, ea, eb, units, a, b, null, level, ci_method)})
        cols.append(a - b)
    return rows, np.stack(cols, 1)


def pool_seeds(pairs: Sequence[tuple], direction: Direction | str, task: str = "report", metric: str | None = None,
               rate_label: str | None = None, labels=None, n_boot: int = 1000, n_perm: int = 1000, seed: int = 0,
               level: float = 0.95, ci_method: str = "bca", cluster: bool = True, run: str = "fairllava") -> dict:
    """Pool several seeds' ``(baseline, method)`` prediction files (paths, row lists or EvalData).

    Within a pair the ids must match exactly; all files must be the same task (label field, attributes, and the
    same references for shared ids). ``metric`` defaults to the task's key metric; ``rate_label`` pools the
    false-positive rate of that label instead. Returns :func:`pool_paired`'s dict plus ``metric`` and ``files``.
    """
    from .compare import load_pair
    from .evaluate import build_metrics
    from .signed import KEY_METRIC, rate_metric

    if not pairs:
        raise FairllavaError("--pair: expected at least one BASELINE METHOD pair")
    d = as_direction(direction)
    metric_name = f"fpr_{rate_label.strip().upper()}" if rate_label else (metric or KEY_METRIC[task])
    loaded = []
    for k, (pa, pb) in enumerate(pairs):
        a, b = load_pair(pa, pb, task)
        loaded.append((a, b))
    _check_same_task(loaded)
    seeds = []
    for k, (a, b) in enumerate(loaded):
        check_direction(d, a.attributes, a.source)
        ms = []
        for side in (a, b):
            if rate_label:
                stats, _, extra = build_metrics(side, task, ["accuracy"], labels)
                ms.append(rate_metric(extra["parsed_label"], extra["label"], rate_label))
            else:
                stats, skipped, _ = build_metrics(side, task, [metric_name], labels)
                if metric_name not in stats:
                    raise FairllavaError(f"{side.source}: metric {metric_name!r} unavailable "
                                         f"({skipped.get(metric_name, 'not computed')})")
                ms.append(stats[metric_name])
        seeds.append(SeedPair(ms[0], ms[1], a.attributes[d.attribute], a.group_ids if cluster else None,
                              a.labels, a.ids, name=f"pair{k + 1}"))
    res = pool_paired(seeds, d, n_boot=n_boot, n_perm=n_perm, seed=seed, level=level, ci_method=ci_method, run=run)
    for row, (a, b) in zip(res["per_seed"], loaded):
        row["baseline_file"], row["method_file"] = a.source, b.source
        row["n_samples"] = a.n
    res.update(metric=metric_name, task=task,
               resampling="cluster (group_id)" if cluster and all(a.group_ids for a, _ in loaded) else "iid")
    return res


def _check_same_task(loaded) -> None:
    a0 = loaded[0][0]
    refs0 = dict(zip(a0.ids, a0.references))
    for k, (a, b) in enumerate(loaded):
        for x in (a, b):
            if x.label_field != a0.label_field:
                raise FairllavaError(f"{x.source}: pair {k + 1} is another task than {a0.source} (rows "
                                     f"{'carry' if x.label_field else 'lack'} a 'label' field)")
            if sorted(x.attributes) != sorted(a0.attributes):
                raise FairllavaError(f"{x.source}: pair {k + 1} is another task than {a0.source} (attributes "
                                     f"{sorted(x.attributes)} vs {sorted(a0.attributes)})")
        shared = [i for i, rid in enumerate(a.ids) if rid in refs0]
        for i in shared:
            if a.references[i] != refs0[a.ids[i]]:
                raise FairllavaError(f"{a.source}: pair {k + 1} is another task or test set than {a0.source} "
                                     f"(id={a.ids[i]} has another reference)")
        if k and not shared:
            raise FairllavaError(f"{a.source}: pair {k + 1} shares no sample id with {a0.source}; seeds must be "
                                 "evaluated on the same task and test set")


def pair_paths(tokens: Sequence[str]) -> list[tuple[str, str]]:
    """``["--pair", A, B, "--pair", C, D]`` or ``[A, B]`` -> ``[(A, B), ...]`` (the CLI's argument form)."""
    toks = list(tokens)
    if "--pair" not in toks:
        if len(toks) != 2:
            raise FairllavaError(f"compare: expected BASELINE METHOD or --pair BASELINE METHOD (repeatable), got "
                                 f"{len(toks)} file(s)")
        return [(toks[0], toks[1])]
    pairs = []
    i = 0
    while i < len(toks):
        if toks[i] != "--pair":
            raise FairllavaError(f"compare: unexpected argument {toks[i]!r} (files go after --pair, two at a time)")
        if len(toks) - i < 3:
            raise FairllavaError(f"--pair: expected two files (BASELINE METHOD), got {toks[i + 1:]}")
        a, b = toks[i + 1], toks[i + 2]
        if a.startswith("--") or b.startswith("--"):
            raise FairllavaError(f"--pair: expected two files (BASELINE METHOD), got {a!r} {b!r}")
        pairs.append((a, b))
        i += 3
    for a, b in pairs:
        for f in (a, b):
            if not os.path.isfile(f):
                raise FairllavaError(f"--pair: {f}: no such file")
    return pairs
