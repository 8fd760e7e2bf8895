"""Permutation test that all groups of an attribute score the same (the null of the paper's max−min gap).

Why: the max−min gap is never negative, so its bootstrap CI cannot show "no difference" (EVALUATION §5.2b).
Its permutation null can: group labels are shuffled among units (whole patients; within strata of the task
label, see :mod:`fairllava.fairness.units`) and the max−min gap is recomputed; ``p = (1 + #{Δ* >= Δ}) / (1 + P)``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..metrics.base import MetricStats
from .signed import as_metric
from .units import build_units, permutation_pvalue, stratified_permutations


def all_groups_equal_pvalue(metric: MetricStats | Sequence[float], values: Sequence[str | None],
                            groups: Sequence[str], *, clusters: Sequence | None = None, labels: Sequence | None = None,
                            n_perm: int = 1000, rng: np.random.Generator | None = None) -> float | None:
    """Permutation p-value of the max−min gap over ``groups`` (None with fewer than 2 groups or no permutations)."""
    groups = list(groups)
    if len(groups) < 2 or n_perm < 1:
        return None
    ms = as_metric(metric)
    units = build_units(values, groups, clusters, labels)
    S, n = units.sums(ms.stats), units.counts()
    rng = rng or np.random.default_rng(0)

    def gap(assign: np.ndarray) -> np.ndarray:  # assign [B, U] group index per unit
        cols = []
        for g in range(len(groups)):
            M = (assign == g).astype(np.float64)
            cols.append(ms.reduce(M @ S, M @ n))
        E = np.stack(cols, 1)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(E).sum(1) >= 2
            E = np.where(np.isfinite(E), E, np.nan)
            lo = np.nanmin(np.where(np.isfinite(E), E, np.inf), axis=1)
            hi = np.nanmax(np.where(np.isfinite(E), E, -np.inf), axis=1)
        return np.where(ok, hi - lo, np.nan)

    observed = float(gap(units.group[None, :])[0])
    null = np.concatenate([gap(units.group[P]) for P in stratified_permutations(units.stratum, n_perm, rng)])
    return permutation_pvalue(observed, null)
