"""Cross-sectional (stratified) gaps, EVALUATION §5.4.

Why: a race gap can be an age gap in disguise when age differs between races. Within each stratum of
the other attributes (e.g. race within age×sex), the gap of the target attribute is computed over groups
with n >= n_min; strata with fewer than two eligible groups are skipped (and listed). The aggregate is
the n-weighted (or equal-weighted) mean of the stratum gaps.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .frame import frame_scores, group_index


def stratified_gap(result, target: str, metric: str, strata_attributes: Sequence[str] | None = None,
                   n_min: int = 30, weighting: str = "size") -> dict:
    """Gap of ``target`` for ``metric`` within each stratum of ``strata_attributes`` (default: all others)."""
    if weighting not in ("size", "equal"):
        raise ValueError(f"weighting must be 'size' or 'equal', got {weighting!r}")
    values = result.attribute_values
    base = [a for a in values if "&" not in a]
    if target not in base:
        raise ValueError(f"target attribute {target!r} not evaluated (have {base})")
    if metric not in result.metric_stats:
        raise ValueError(f"metric {metric!r} not evaluated (have {list(result.metric_stats)})")
    others = [a for a in (strata_attributes or base) if a != target]
    if not others:
        raise ValueError("stratified gaps need at least one other attribute to stratify by")
    ms = result.metric_stats[metric]
    n = len(values[target])
    keys = [None if any(values[o][i] is None for o in others) else "&".join(values[o][i] for o in others)
            for i in range(n)]
    used, skipped = [], []
    for s in sorted({k for k in keys if k is not None}):
        idx = np.array([i for i in range(n) if keys[i] == s and values[target][i] is not None], dtype=np.int64)
        gi = group_index(target, [values[target][i] for i in idx], n_min)
        if len(gi.eligible) < 2:
            skipped.append({"stratum": s, "n": int(len(idx)), "reason": f"{len(gi.eligible)} group(s) with n >= {n_min}"})
            continue
        sub = ms.subset(idx)
        sc = frame_scores(sub, np.ones((1, len(idx))), gi)
        n_elig = int(sum(len(gi.groups[g]) for g in gi.eligible))
        names = list(gi.groups)
        used.append({"stratum": s, "n": n_elig, "gap": float(sc["gap"][0]),
                     "groups": {g: {"n": int(len(gi.groups[g])), "value": float(sc["groups"][0, names.index(g)])}
                                for g in gi.eligible},
                     "excluded_groups": gi.excluded})
    if used:
        w = np.array([u["n"] if weighting == "size" else 1.0 for u in used], dtype=np.float64)
        agg = float(np.sum(w / w.sum() * np.array([u["gap"] for u in used])))
    else:
        agg = None
    return {"target": target, "metric": metric, "strata_by": others, "n_min": n_min, "weighting": weighting,
            "gap": agg, "strata": used, "skipped": skipped}


def stratified_gaps(result, n_min: int = 30, weighting: str = "size") -> list[dict]:
    """``stratified_gap`` for every (base attribute, metric) of an evaluation with >= 2 attributes."""
    base = [a for a in result.attribute_values if "&" not in a]
    return [stratified_gap(result, a, m, n_min=n_min, weighting=weighting) for a in base for m in result.metric_stats]
