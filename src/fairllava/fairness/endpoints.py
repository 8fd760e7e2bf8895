"""Endpoints of a paired comparison: which signed-gap differences are tested, which are primary, Holm per family.

Why a declared primary family: a table of 36 p-values will show something at 0.05 by chance. The user names
the endpoints that decide (``--primary race:accuracy``); Holm controls the family-wise error over them, and
the report leads with them. Everything else is secondary (Holm-adjusted among themselves, exploratory).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import FairllavaError
from .compare import holm
from .paired import mcnemar_by_group, paired_signed_gap
from .signed import KEY_METRIC


def endpoint_id(attribute: str, metric: str) -> str:
    return f"{attribute}:{metric}"


def default_primary(directions, metrics: Sequence[str], task: str) -> list[str]:
    """The first direction's attribute with the task's key metric (or, failing that, the first metric)."""
    if not directions or not metrics:
        return []
    key = KEY_METRIC.get(task)
    m = key if key in metrics else metrics[0]
    return [endpoint_id(directions[0].attribute, m)]


def paired_endpoints(ra, rb, task: str, primary: Sequence[str] | None, names: tuple[str, str], n_boot: int,
                     n_perm: int, seed: int, ci_method: str, run: str) -> tuple[list[dict], list[str], dict]:
    """Signed-gap differences for every direction x metric of two aligned evaluations, Holm per family."""
    dirs = list(ra.directions)
    metrics = [m for m in ra.metrics if m in rb.metrics]
    if not dirs:
        if primary:
            raise FairllavaError("--primary needs --direction (the primary endpoints are signed-gap differences)")
        return [], [], {}
    data = ra.data
    clusters = data.group_ids if ra.meta["resampling"].startswith("cluster") else None
    labels = None if data.labels is None else [t.strip().upper() for t in data.labels]
    rows = []
    for d in dirs:
        for m in metrics:
            r = paired_signed_gap(ra.metric_stats[m], rb.metric_stats[m], ra.attribute_values[d.attribute], d,
                                  clusters=clusters, labels=labels, n_boot=n_boot, n_perm=n_perm, seed=seed,
                                  ci_method=ci_method, run=run)
            rows.append({"endpoint": endpoint_id(d.attribute, m), "attribute": d.attribute, "metric": m,
                         "quantity": "signed_gap_diff", "direction": d.spec, "direction_source": d.source,
                         names[0]: r["baseline"], f"{names[0]}_ci": r["baseline_ci"],
                         names[1]: r["method"], f"{names[1]}_ci": r["method_ci"],
                         "diff": r["diff"], "ci": r["ci"], "p_value": r["p_value"], "p_two_sided": r["p_two_sided"],
                         "resampling": r["resampling"], "ci_method": ci_method})
    available = [r["endpoint"] for r in rows]
    prim = list(primary) if primary else default_primary(dirs, metrics, task)
    for e in prim:
        if e not in available:
            raise FairllavaError(f"--primary {e!r}: not an endpoint of this comparison; choose from "
                                 f"{', '.join(available)}")
    for r in rows:
        r["family"] = "primary" if r["endpoint"] in prim else "secondary"
    for fam in ("primary", "secondary"):
        sel = [r for r in rows if r["family"] == fam]
        for r, p in zip(sel, holm([r["p_value"] for r in sel])):
            r["p_holm"] = p
    rows.sort(key=lambda r: (r["family"] != "primary", prim.index(r["endpoint"]) if r["endpoint"] in prim else 0))
    return rows, prim, _mcnemar(ra, rb, dirs) if task == "vqa" else {}


def _mcnemar(ra, rb, dirs) -> dict:
    """Exact McNemar per group: per-sample correctness, and false positives of each ``fpr_<LABEL>`` metric."""
    out: dict = {}
    for attr in dict.fromkeys(d.attribute for d in dirs):
        values = ra.attribute_values[attr]
        cell = out.setdefault(attr, {})
        if "accuracy" in ra.metric_stats:
            ca = np.asarray(ra.metric_stats["accuracy"].per_sample) > 0
            cb = np.asarray(rb.metric_stats["accuracy"].per_sample) > 0
            cell["accuracy"] = mcnemar_by_group(ca, cb, values, better="higher")
        for m, ms in ra.metric_stats.items():
            if m.startswith("fpr_"):
                fa, fb = ms.stats[:, 0] > 0, rb.metric_stats[m].stats[:, 0] > 0
                cell[m] = mcnemar_by_group(fa, fb, values, eligible=ms.stats[:, 1] > 0, better="lower")
    return out
