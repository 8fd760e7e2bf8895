"""Group scores, gaps and equity-scaled scores for one attribute (EVALUATION §5.1).

``M_g`` is the metric recomputed on group g's samples (corpus metrics from summed statistics,
per-sample metrics averaged); ``Δ = max_g M_g − min_g M_g`` over groups with ``n_g >= n_min``;
``ES = M_all / (1 + Δ)`` with ``M_all`` the metric on the whole evaluated set (percent units);
the FairCLIP form ``M_all / (1 + Σ_g |M_g − M_all|)`` is computed separately as ``es_fairclip``.
Everything is computed for a batch of resample weight vectors, the point estimate being the
all-ones weight vector, so point values and bootstrap replicates share one code path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..metrics.base import MetricStats

ES_VARIANTS = ("maxmin", "fairclip")


@dataclass
class GroupIndex:
    """The groups of one attribute: member indices, which are eligible for gaps, which are too small."""

    attribute: str
    groups: dict[str, np.ndarray]
    eligible: list[str]
    excluded: dict[str, int]
    n_missing: int
    missing_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def strata(self) -> list[np.ndarray]:
        """Partition of all samples for a stratified bootstrap: each group plus the missing-value rows."""
        parts = list(self.groups.values())
        if len(self.missing_idx):
            parts.append(self.missing_idx)
        return parts


def group_index(attribute: str, values: Sequence[str | None], n_min: int) -> GroupIndex:
    vals = list(values)
    names = sorted({v for v in vals if v is not None})
    groups = {g: np.array([i for i, v in enumerate(vals) if v == g], dtype=np.int64) for g in names}
    eligible = [g for g in names if len(groups[g]) >= n_min]
    excluded = {g: int(len(groups[g])) for g in names if len(groups[g]) < n_min}
    missing = np.array([i for i, v in enumerate(vals) if v is None], dtype=np.int64)
    return GroupIndex(attribute, groups, eligible, excluded, int(len(missing)), missing)


def frame_scores(metric: MetricStats, weights: np.ndarray, gi: GroupIndex | None) -> dict[str, np.ndarray]:
    """Scores for each weight row ``weights[B, N]``: ``all [B]``; with ``gi`` also ``groups [B, G]`` (order of
    ``gi.groups``), ``gap``, ``es``, ``es_fairclip``, ``worst`` and ``std`` ``[B]`` (eligible groups only)."""
    out = {"all": metric.weighted(weights)}
    if gi is None:
        return out
    names = list(gi.groups)
    G = np.full((weights.shape[0], len(names)), np.nan)
    for j, g in enumerate(names):
        idx = gi.groups[g]
        G[:, j] = metric.weighted(weights[:, idx], idx)
    out["groups"] = G
    cols = [names.index(g) for g in gi.eligible]
    B = weights.shape[0]
    if len(cols) >= 2:
        E = G[:, cols]
        with np.errstate(invalid="ignore"), _quiet():
            gap = np.nanmax(E, axis=1) - np.nanmin(E, axis=1)
            dev = np.nansum(np.abs(E - out["all"][:, None]), axis=1)
            out["worst"] = np.nanmin(E, axis=1)
            out["std"] = np.nanstd(E, axis=1)
        gap = np.where(np.isfinite(E).sum(1) >= 2, gap, np.nan)
        out["gap"] = gap
        out["es"] = out["all"] / (1.0 + gap)
        out["es_fairclip"] = out["all"] / (1.0 + dev)
    else:
        nan = np.full(B, np.nan)
        out.update(gap=nan, es=nan.copy(), es_fairclip=nan.copy(), worst=nan.copy(), std=nan.copy())
        if len(cols) == 1:
            out["worst"] = G[:, cols[0]].copy()
            out["std"] = np.zeros(B)
    return out


class _quiet:
    """Silence numpy's all-NaN-slice RuntimeWarnings (an empty group in a resample is expected)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)
