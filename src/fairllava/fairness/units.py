"""Resampling units for the inference statistics: whole patients (``group_id``) within one demographic group.

Why units: samples of one patient are correlated, so bootstrap draws and permutations must move a patient's
samples together. A unit is one ``(group_id, group value)`` pair: normally a whole patient (race and sex do not
change between studies); a patient whose value changes (age group across years) is split at the change, so
every unit belongs to exactly one group and the bootstrap can keep each group's number of units. Without
``group_id`` every sample is its own unit (iid).

A unit's permutation stratum is the multiset of task labels of its samples: units with the same labels are
exchangeable under "the group does not matter", units with different labels are not (a group that has more
hard cases is not a fairness problem of the model). Without labels there is one stratum.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class Units:
    """Units over the samples of ``groups`` (others are left out)."""

    groups: list[str]
    sample_idx: np.ndarray  # [n] indices (into the full data) of the samples used
    inverse: np.ndarray  # [n] unit of each used sample
    group: np.ndarray  # [U] index into ``groups`` of each unit
    stratum: np.ndarray  # [U] permutation stratum of each unit
    clustered: bool

    @property
    def n_units(self) -> int:
        return int(len(self.group))

    def sums(self, stats: np.ndarray) -> np.ndarray:
        """Per-unit sums ``[U, K]`` of full-data per-sample statistics ``[N, K]``."""
        stats = np.asarray(stats, dtype=np.float64)
        if stats.ndim == 1:
            stats = stats[:, None]
        out = np.zeros((self.n_units, stats.shape[1]))
        np.add.at(out, self.inverse, stats[self.sample_idx])
        return out

    def counts(self) -> np.ndarray:
        return np.bincount(self.inverse, minlength=self.n_units).astype(np.float64)

    def members(self, g: int) -> np.ndarray:
        return np.flatnonzero(self.group == g)

    @property
    def resampling(self) -> str:
        return "cluster (group_id)" if self.clustered else "iid (no group_id)"


def build_units(values: Sequence[str | None], groups: Sequence[str], clusters: Sequence | None = None,
                labels: Sequence | None = None) -> Units:
    """Units of the samples whose ``values`` are in ``groups``; ``clusters`` are per-sample group_ids."""
    groups = list(groups)
    code = {g: k for k, g in enumerate(groups)}
    idx = np.array([i for i, v in enumerate(values) if v in code], dtype=np.int64)
    keys: dict = {}
    inverse = np.empty(len(idx), dtype=np.int64)
    unit_group: list[int] = []
    for j, i in enumerate(idx):
        key = (clusters[i] if clusters is not None else i, values[i])
        u = keys.get(key)
        if u is None:
            u = keys[key] = len(unit_group)
            unit_group.append(code[values[i]])
        inverse[j] = u
    n_units = len(unit_group)
    if labels is None:
        stratum = np.zeros(n_units, dtype=np.int64)
    else:
        comp: list[list[str]] = [[] for _ in range(n_units)]
        for j, i in enumerate(idx):
            comp[inverse[j]].append(str(labels[i]))
        names: dict = {}
        stratum = np.array([names.setdefault(tuple(sorted(c)), len(names)) for c in comp], dtype=np.int64)
    return Units(groups, idx, inverse, np.asarray(unit_group, dtype=np.int64), stratum,
                 clustered=clusters is not None)


CHUNK = 200  # permutations per block (bounds memory at CHUNK x U)


def stratified_permutations(strata: np.ndarray, n_perm: int, rng: np.random.Generator):
    """Blocks ``[<=CHUNK, U]`` of permutations of ``range(U)`` that only move units within their stratum.

    Row ``p`` maps position ``j`` to unit ``perm[p, j]`` of the same stratum; so ``labels[perm]`` is a
    relabelling that keeps every stratum's label counts.
    """
    strata = np.asarray(strata, dtype=np.int64)
    U = len(strata)
    order = np.argsort(strata, kind="stable")
    rank = np.empty(U, dtype=np.int64)
    rank[order] = np.arange(U)
    sorted_strata = strata[order].astype(np.float64)
    for start in range(0, n_perm, CHUNK):
        b = min(CHUNK, n_perm - start)
        keys = sorted_strata[None, :] + rng.random((b, U))  # random order inside each stratum block
        perm_sorted = order[np.argsort(keys, axis=1)]  # [b, U] unit ids, block by block
        yield perm_sorted[:, rank]  # back to the units' own positions


def permutation_pvalue(observed: float, null: np.ndarray) -> float | None:
    """``(1 + #{T* >= T}) / (1 + P)`` (Phipson & Smyth: never 0, exact level under exchangeability)."""
    null = np.asarray(null, dtype=np.float64)
    null = null[np.isfinite(null)]
    if not np.isfinite(observed) or null.size == 0:
        return None
    return float((1.0 + np.sum(null >= observed - 1e-12)) / (1.0 + null.size))
