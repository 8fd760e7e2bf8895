"""Paired bootstrap comparison of two systems (EVALUATION §5.3).

Both systems are scored on the intersection of their sample ids with the *same* resample indices (the
seed of each (attribute, metric) cell depends only on run/attribute/metric and the shared id order), so
the bootstrap distribution of the difference is paired. A is the baseline, B the method:
gap ``d* = Δ*_A − Δ*_B``, ES ``d* = ES*_B − ES*_A``; one-sided ``p = (1 + #{d* <= 0}) / (1 + R)``
(H1: B is fairer); two-sided ``min(1, 2·min(p, 1 − p))``; Holm over the whole table (``p_holm``).

With ``directions`` (issue 12) the *endpoints* are signed-gap differences ``Δs_base − Δs_method`` per direction
and metric (:func:`fairllava.fairness.paired.paired_signed_gap`: paired bootstrap CI, paired permutation p),
Holm-adjusted within the family the user declares primary (the rest: within the secondary family); for VQA
also exact McNemar tests per group of per-sample correctness and of the ``--rate`` false positives.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import FairllavaError
from .evaluate import EvalData, FairnessResult, _hash_rows, evaluate_predictions, load_predictions


@dataclass
class ComparisonResult:
    results: dict[str, FairnessResult]
    pvalues: list[dict]
    meta: dict = field(default_factory=dict)
    endpoints: list[dict] = field(default_factory=list)  # signed-gap differences, primary ones first
    primary: list[str] = field(default_factory=list)  # endpoint ids "attribute:metric" declared primary
    mcnemar: dict = field(default_factory=dict)  # attribute -> metric -> group -> exact McNemar result

    def primary_endpoints(self) -> list[dict]:
        return [e for e in self.endpoints if e["family"] == "primary"]


def paired_pvalue(d: np.ndarray) -> tuple[float | None, float | None]:
    """One- and two-sided p for H1: d > 0, from paired bootstrap replicates (NaN replicates dropped)."""
    d = np.asarray(d, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return None, None
    p = (1.0 + np.sum(d <= 0)) / (1.0 + d.size)
    return float(p), float(min(1.0, 2.0 * min(p, 1.0 - p)))


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values (None entries are left out and stay None)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    m = len(idx)
    order = sorted(idx, key=lambda i: pvalues[i])
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def _as_data(p, task: str) -> EvalData:
    return p if isinstance(p, EvalData) else load_predictions(p, task)


def align(a: EvalData, b: EvalData, strict_ids: bool = False) -> tuple[EvalData, EvalData, dict]:
    """Restrict both to the shared ids (A's order); B takes A's references/attributes/labels after checking them."""
    pos_b = {rid: i for i, rid in enumerate(b.ids)}
    shared = [i for i, rid in enumerate(a.ids) if rid in pos_b]
    only_a, only_b = a.n - len(shared), b.n - len(shared)
    if not shared:
        raise FairllavaError(f"{b.source}: it and {a.source} share no sample ids (e.g. {b.ids[0]!r} vs {a.ids[0]!r})")
    if strict_ids and (only_a or only_b):
        ids_a = set(a.ids)
        ex_a = next((r for r in a.ids if r not in pos_b), None)
        ex_b = next((r for r in b.ids if r not in ids_a), None)
        raise FairllavaError(f"{b.source}: mismatched ids with {a.source}: {only_a} only in the first"
                             f"{f' (e.g. id={ex_a})' if ex_a else ''}, {only_b} only in the second"
                             f"{f' (e.g. id={ex_b})' if ex_b else ''}")
    for i in shared:
        j = pos_b[a.ids[i]]
        if a.references[i] != b.references[j]:
            raise FairllavaError(f"{b.source} (id={a.ids[i]}): reference differs from {a.source}; "
                                 "both systems must be scored against the same references")
        if a.labels is not None and b.labels is not None and a.labels[i] != b.labels[j]:
            raise FairllavaError(f"{b.source} (id={a.ids[i]}): label differs from {a.source}")
    if a.group_ids is not None and b.group_ids is not None:
        for i in shared:
            if a.group_ids[i] != b.group_ids[pos_b[a.ids[i]]]:
                raise FairllavaError(f"{b.source} (id={a.ids[i]}): group_id differs from {a.source}")
    a2 = a.subset(shared)
    b2 = a.subset(shared)
    b2.predictions = [b.predictions[pos_b[rid]] for rid in a2.ids]
    b2.source = b.source
    b2.data_hash = _hash_rows(b2, range(b2.n))
    return a2, b2, {"n_shared": len(shared), "n_only_first": only_a, "n_only_second": only_b}


def load_pair(preds_a, preds_b, task: str = "report") -> tuple[EvalData, EvalData]:
    """Load a (baseline, method) pair whose ids must match exactly (one-line error naming the file otherwise)."""
    a, b = _as_data(preds_a, task), _as_data(preds_b, task)
    a2, b2, _ = align(a, b, strict_ids=True)
    return a2, b2


def compare(preds_a, preds_b, task: str = "report", names: tuple[str, str] = ("baseline", "method"),
            holm_correction: bool = False, strict_ids: bool = False, primary: Sequence[str] | None = None,
            **kwargs: Any) -> ComparisonResult:
    """Evaluate A (baseline) and B (method) on their shared ids and test gap/ES differences.

    ``kwargs`` go to :func:`evaluate_predictions` (attributes, n_min, n_boot, seed, es_variant, metrics,
    directions, rate_labels, cluster, n_perm, ci_method, ...). With ``directions`` the signed-gap endpoints are
    added (see the module docstring); ``primary`` lists the endpoint ids (``"race:accuracy"``) of the primary
    family (default: the first direction's attribute with the task's key metric).
    """
    if names[0] == names[1]:
        raise ValueError(f"names must differ, got {names}")
    if kwargs.get("n_boot", 1000) < 1:
        raise ValueError("compare needs n_boot >= 1")
    a, b = _as_data(preds_a, task), _as_data(preds_b, task)
    a, b, counts = align(a, b, strict_ids)
    kwargs.setdefault("run", "fairllava")
    ra = evaluate_predictions(a, task, **kwargs)
    rb = evaluate_predictions(b, task, **kwargs)
    es_key = "es" if ra.es_variant == "maxmin" else "es_fairclip"
    rows = []
    for attr in ra.attributes:
        for m in ra.metrics:
            if m not in rb.metrics:
                continue
            A, B = ra.replicates[(attr, m)], rb.replicates[(attr, m)]
            for quantity, d, va, vb in (
                ("gap", A["gap"] - B["gap"], ra.gap[attr][m], rb.gap[attr][m]),
                (es_key, B[es_key] - A[es_key], ra.es_reported[attr][m], rb.es_reported[attr][m]),
            ):
                p1, p2 = paired_pvalue(d)
                rows.append({"attribute": attr, "metric": m, "quantity": quantity, names[0]: va, names[1]: vb,
                             "diff": None if va is None or vb is None else (va - vb if quantity == "gap" else vb - va),
                             "p_one_sided": p1, "p_two_sided": p2})
    for r, p in zip(rows, holm([r["p_one_sided"] for r in rows])):
        r["p_holm"] = p  # always shown (issue 12); holm_correction is kept for callers that pass it
    from .endpoints import paired_endpoints

    endpoints, prim, mcn = paired_endpoints(ra, rb, task, primary, names, kwargs.get("n_boot", 1000),
                                            kwargs.get("n_perm", 1000), kwargs.get("seed", 0),
                                            kwargs.get("ci_method", "bca"), kwargs["run"])
    meta = dict(counts, names=list(names), baseline=names[0], method=names[1], n_resamples=ra.meta["n_resamples"],
                seed=ra.meta["seed"], run=ra.meta["run"], holm=True, es_variant=ra.es_variant,
                resampling=ra.meta["resampling"], primary=prim,
                test="paired one-sided bootstrap: p = (1 + #{d* <= 0}) / (1 + R); gap d* = gap_base - gap_method; "
                     "ES d* = ES_method - ES_base; two-sided = min(1, 2 min(p, 1 - p)); p_holm over this table",
                endpoint_test="signed-gap difference d = signed_gap(baseline) - signed_gap(method): paired bootstrap "
                              "CI (same unit draws for both), paired permutation p (swap the systems' outputs per "
                              "unit), one-sided H1 d > 0; p_holm within the primary family (secondary: within the rest)")
    return ComparisonResult({names[0]: ra, names[1]: rb}, rows, meta, endpoints, prim, mcn)


def compare_systems(baseline, method, task: str = "report", directions: Sequence[Any] = (),
                    rate_labels: Sequence[str] = (), primary: Sequence[str] | None = None,
                    names: tuple[str, str] = ("baseline", "method"), **kwargs: Any) -> ComparisonResult:
    """Paired comparison of two systems on exactly the same ids: signed-gap differences (``endpoints``, primary
    family first, Holm-adjusted), McNemar per group (VQA), plus everything :func:`compare` reports."""
    if not directions:
        raise FairllavaError("compare_systems: name at least one direction (e.g. 'race=light>dark')")
    return compare(baseline, method, task, names=names, strict_ids=True, primary=primary, directions=directions,
                   rate_labels=rate_labels, **kwargs)
