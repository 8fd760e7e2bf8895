"""``evaluate_predictions``: predictions JSONL -> per-group metrics, gaps, ES and bootstrap CIs.

The predictions contract (DESIGN.md): one object per row with ``id``, ``prediction``, ``reference``,
``attributes`` ({name: value or null}) and, for VQA, ``label``. Missing attribute values are excluded from
that attribute's groups but count in the overall score. Small groups (n < n_min) are reported and
excluded from gaps/ES. All values are in percent.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
import platform
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import FairllavaError
from ..io import read_jsonl
from ..metrics.base import MetricStats
from .bootstrap import bootstrap_scores, cluster_inverse, percentile_ci, rng_for
from .frame import ES_VARIANTS, GroupIndex, frame_scores, group_index

log = logging.getLogger(__name__)

TASKS = ("report", "vqa")
REPORT_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "meteor", "cider", "keyword_f1")
VQA_METRICS = ("accuracy", "macro_f1", "balanced_accuracy", "bleu1", "bleu4", "rouge_l")  # + HAM text metrics
OVERALL = "__overall__"


@dataclass
class EvalData:
    """Validated predictions in column form (no text is ever written out except via ids)."""

    ids: list[str]
    predictions: list[str]
    references: list[str]
    attributes: dict[str, list[str | None]]
    labels: list[str] | None
    source: str
    data_hash: str
    group_ids: list[str] | None = None  # patient/lesion cluster per sample (None: no row carries one)
    label_field: bool = False  # whether the rows carry a task 'label' (tells a VQA file from a report file)

    @property
    def n(self) -> int:
        return len(self.ids)

    def subset(self, idx: Sequence[int]) -> "EvalData":
        idx = list(idx)
        return EvalData([self.ids[i] for i in idx], [self.predictions[i] for i in idx], [self.references[i] for i in idx],
                        {a: [v[i] for i in idx] for a, v in self.attributes.items()},
                        None if self.labels is None else [self.labels[i] for i in idx], self.source,
                        _hash_rows(self, idx), None if self.group_ids is None else [self.group_ids[i] for i in idx],
                        self.label_field)


def _hash_rows(d: EvalData, idx: Sequence[int]) -> str:
    h = hashlib.sha256()
    for i in idx:
        row = [d.ids[i], d.predictions[i], d.references[i], sorted((a, v[i]) for a, v in d.attributes.items()),
               None if d.labels is None else d.labels[i]]
        h.update(json.dumps(row, ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def load_predictions(preds: Sequence[dict] | str | os.PathLike, task: str = "report") -> EvalData:
    """Validate predictions rows (from a list or a JSONL path); bad rows raise FairllavaError naming row and id."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    required = ["id", "prediction", "reference", "attributes"] + (["label"] if task == "vqa" else [])
    if isinstance(preds, (str, os.PathLike)):
        source = str(preds)
        rows = read_jsonl(preds, required=required)
        with open(preds, encoding="utf-8") as f:  # line numbers of the non-blank lines, for error messages
            lines = [k for k, line in enumerate(f, 1) if line.strip()]
        where = lambda i: f"{source}:{lines[i]}"  # noqa: E731
    else:
        source = "<predictions>"
        rows = list(preds)
        where = lambda i: f"row {i}"  # noqa: E731
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise FairllavaError(f"{where(i)}: expected a dict, got {type(r).__name__}")
            missing = [k for k in required if k not in r]
            if missing:
                raise FairllavaError(f"{where(i)} (id={r.get('id', '?')}): missing field(s) {', '.join(missing)}")
    if not rows:
        raise FairllavaError(f"{source}: no predictions")
    ids, P, R, L, C = [], [], [], [], []
    seen: dict[str, int] = {}
    attr_rows: list[dict] = []
    for i, r in enumerate(rows):
        rid = r["id"]
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise FairllavaError(f"{where(i)}: 'id' must be a string, got {type(rid).__name__}")
        rid = str(rid)
        if rid in seen:
            raise FairllavaError(f"{where(i)} (id={rid}): duplicate id (first at {where(seen[rid])})")
        seen[rid] = i
        for k in ("prediction", "reference"):
            if not isinstance(r[k], str):
                raise FairllavaError(f"{where(i)} (id={rid}): '{k}' must be a string, got {type(r[k]).__name__}")
        if task == "report" and not r["reference"].strip():
            raise FairllavaError(f"{where(i)} (id={rid}): empty 'reference' (a reference report is required)")
        if not isinstance(r["attributes"], dict):
            raise FairllavaError(f"{where(i)} (id={rid}): 'attributes' must be an object")
        for a, v in r["attributes"].items():
            if v is not None and not isinstance(v, (str, int, float)) or isinstance(v, bool):
                raise FairllavaError(f"{where(i)} (id={rid}): attribute {a!r} must be a string or null")
        if task == "vqa" and not isinstance(r["label"], str):
            raise FairllavaError(f"{where(i)} (id={rid}): 'label' must be a string for task=vqa")
        gid = r.get("group_id")
        if gid is not None and (not isinstance(gid, (str, int)) or isinstance(gid, bool)):
            raise FairllavaError(f"{where(i)} (id={rid}): 'group_id' must be a string, got {type(gid).__name__}")
        C.append(None if gid is None else str(gid))
        ids.append(rid)
        P.append(r["prediction"])
        R.append(r["reference"])
        L.append(r.get("label"))
        attr_rows.append(r["attributes"])
    names = sorted({a for ar in attr_rows for a in ar})
    attributes = {a: [None if ar.get(a) is None else str(ar.get(a)) for ar in attr_rows] for a in names}
    n_gid = sum(g is not None for g in C)
    # A row without group_id (when others have one) is its own cluster; no row with one -> iid resampling.
    clusters = [g if g is not None else f"\x00id:{rid}" for g, rid in zip(C, ids)] if n_gid else None
    d = EvalData(ids, P, R, attributes, L if task == "vqa" else None, source, "", clusters,
                 any(lab is not None for lab in L))
    d.data_hash = _hash_rows(d, range(d.n))
    return d


def build_metrics(data: EvalData, task: str, metrics: Sequence[str] | None = None, labels=None,
                  scorers: Sequence[Any] = (), rates: Sequence[str] = ()
                  ) -> tuple[dict[str, MetricStats], dict[str, str], dict[str, list]]:
    """Compute per-sample statistics; returns ``(metrics, skipped {name: reason}, extra per-sample columns)``.

    ``rates``: VQA labels whose false-positive rate is added as metric ``fpr_<LABEL>`` (lower is better)."""
    from ..metrics.chexpert_rules import keyword_f1_metrics
    from ..metrics.clinical import clinical_metrics
    from ..metrics.text import TEXT_METRICS, sentence_bleu_metric, text_metrics
    from ..metrics.vqa import LabelSet, vqa_metrics

    extra: dict[str, list] = {}
    if task == "vqa":
        wanted = list(metrics or VQA_METRICS)
        bad = [m for m in wanted if m not in VQA_METRICS]
        if bad:
            raise FairllavaError(f"--metrics: unknown VQA metric(s) {bad}; choose from {list(VQA_METRICS)}")
        if labels is None:
            labelset = LabelSet.ham()
        elif isinstance(labels, LabelSet):
            labelset = labels
        else:
            try:
                labelset = LabelSet.ham(list(labels))
            except ValueError as e:
                raise FairllavaError(str(e)) from None
        for rid, t in zip(data.ids, data.labels):
            if t.strip().upper() not in labelset.codes:
                raise FairllavaError(f"{data.source} (id={rid}): label {t!r} is not one of {labelset.codes} (--labels)")
        vm, parsed = vqa_metrics(data.predictions, data.labels, labelset)
        out = {}
        for m in wanted:  # HAM answer text: sentence BLEU and ROUGE-L averaged (EVALUATION §4)
            if m in vm:
                out[m] = vm[m]
            elif m.startswith("bleu"):
                out[m] = sentence_bleu_metric(data.predictions, data.references, int(m[-1]))
            else:
                out[m] = text_metrics(data.predictions, data.references, [m])[0][m]
        extra["parsed_label"] = parsed
        extra["label"] = [t.strip().upper() for t in data.labels]
        from .signed import rate_metric

        for lab in rates:
            if lab.strip().upper() not in labelset.codes:
                raise FairllavaError(f"--rate: label {lab!r} is not one of {labelset.codes}")
            rm = rate_metric(parsed, extra["label"], lab)
            out[rm.name] = rm
        return out, {}, extra
    if rates:
        raise FairllavaError(f"--rate {rates[0]!r}: false-positive rates need --task vqa (labelled answers)")
    wanted = list(metrics or REPORT_METRICS)
    bad = [m for m in wanted if m not in REPORT_METRICS]
    if bad:
        raise FairllavaError(f"--metrics: unknown report metric(s) {bad}; choose from {list(REPORT_METRICS)}")
    out, skipped = text_metrics(data.predictions, data.references, [m for m in wanted if m in TEXT_METRICS])
    if "keyword_f1" in wanted:
        out.update(keyword_f1_metrics(data.predictions, data.references))
    out.update(clinical_metrics(data.predictions, data.references, scorers))
    order = [m for m in wanted if m in out or m == "keyword_f1"]
    ordered = {}
    for m in order:
        if m == "keyword_f1":
            ordered.update({k: v for k, v in out.items() if k.startswith("keyword_f1_")})
        else:
            ordered[m] = out[m]
    ordered.update({k: v for k, v in out.items() if k not in ordered})
    return ordered, skipped, extra


@dataclass
class FairnessResult:
    """Everything ``write_evaluation`` writes; ``to_dict()`` is ``metrics.json`` (EVALUATION §5.7)."""

    task: str
    metrics: list[str]
    attributes: list[str]
    overall: dict[str, float]
    groups: dict[str, dict[str, dict[str, float]]]
    gap: dict[str, dict[str, float | None]]
    es: dict[str, dict[str, float | None]]
    es_fairclip: dict[str, dict[str, float | None]]
    worst: dict[str, dict[str, dict]]
    std: dict[str, dict[str, float | None]]
    excluded: dict[str, dict[str, int]]
    n_missing: dict[str, int]
    ci: dict[str, Any]
    es_variant: str
    n: int
    per_sample: list[dict]
    meta: dict
    skipped: dict[str, str] = field(default_factory=dict)
    stratified: list[dict] = field(default_factory=list)
    # inference statistics (issue 12): attribute -> metric -> cell; see fairllava.fairness.signed
    signed_gap: dict[str, dict[str, dict]] = field(default_factory=dict)
    p_all_equal: dict[str, dict[str, float | None]] = field(default_factory=dict)
    directions: list = field(default_factory=list)
    # internals reused by compare()/stratified gaps; not serialised
    data: EvalData | None = field(default=None, repr=False)
    metric_stats: dict[str, MetricStats] = field(default_factory=dict, repr=False)
    group_index: dict[str, GroupIndex] = field(default_factory=dict, repr=False)
    replicates: dict[tuple[str, str], dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    attribute_values: dict[str, list[str | None]] = field(default_factory=dict, repr=False)

    @property
    def es_reported(self) -> dict[str, dict[str, float | None]]:
        return self.es if self.es_variant == "maxmin" else self.es_fairclip

    def to_dict(self) -> dict:
        return {
            "task": self.task, "n": self.n, "es_variant": self.es_variant,
            "overall": self.overall, "groups": self.groups, "gap": self.gap, "es": self.es_reported,
            "worst": self.worst, "std": self.std, "excluded_groups": self.excluded, "n_missing": self.n_missing,
            "ci": {"overall": self.ci["overall"], "groups": self.ci["groups"], "gap": self.ci["gap"],
                   "es": self.ci["es" if self.es_variant == "maxmin" else "es_fairclip"]},
            "skipped_metrics": self.skipped,
            **({"signed_gap": self.signed_gap} if self.signed_gap else {}),
            **({"p_all_groups_equal": self.p_all_equal} if self.p_all_equal else {}),
            **({"stratified": self.stratified} if self.stratified else {}),
        }


def _f(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("fairllava", "numpy", "sacrebleu", "rouge-score", "pycocoevalcap", "scikit-learn"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def add_intersections(attributes: dict[str, list[str | None]], names: Sequence[str]) -> list[str]:
    """Add pairwise intersections ``a&b`` (value ``x&y``, null if either is null); returns their names."""
    new = []
    for a, b in itertools.combinations(names, 2):
        key = f"{a}&{b}"
        attributes[key] = [None if x is None or y is None else f"{x}&{y}" for x, y in zip(attributes[a], attributes[b])]
        new.append(key)
    return new


def evaluate_predictions(predictions: Sequence[dict] | str | os.PathLike | EvalData, task: str = "report",
                         attributes: Sequence[str] | None = None, n_min: int = 20, n_boot: int = 1000, seed: int = 0,
                         es_variant: str = "maxmin", intersections: bool = False, labels=None,
                         metrics: Sequence[str] | None = None, scorers: Sequence[Any] = (),
                         bootstrap: str = "iid", run: str = "fairllava", stratified: bool = False,
                         stratified_n_min: int = 30, progress: bool = False, directions: Sequence[Any] = (),
                         rate_labels: Sequence[str] = (), cluster: bool | str = "auto", n_perm: int = 1000,
                         ci_method: str = "bca") -> FairnessResult:
    """Score predictions overall and per group, with gaps, ES and percentile bootstrap CIs.

    ``attributes=None`` uses every attribute present; ``labels`` is a VQA label set (codes or a LabelSet);
    ``metrics`` restricts the metric list; ``scorers`` are clinical scorers (see fairllava.metrics.clinical);
    ``bootstrap`` is ``"iid"`` or ``"stratified"`` (by the attribute's groups); ``n_boot=0`` skips CIs.
    ``directions`` (``"race=light>dark"`` or :class:`~fairllava.fairness.signed.Direction`) add signed gaps with a
    ``ci_method`` CI and a permutation p (``n_perm``); ``rate_labels`` add ``fpr_<LABEL>`` metrics (VQA);
    ``cluster="auto"`` resamples whole ``group_id`` clusters when the predictions carry them (False: iid).
    Every attribute also gets a permutation p-value for "all groups equal" (``n_perm`` > 0).
    """
    from .signed import as_direction, check_direction
    if es_variant not in ES_VARIANTS:
        raise ValueError(f"es_variant must be one of {ES_VARIANTS}, got {es_variant!r}")
    if bootstrap not in ("iid", "stratified"):
        raise ValueError(f"bootstrap must be 'iid' or 'stratified', got {bootstrap!r}")
    if n_min < 1 or n_boot < 0:
        raise ValueError(f"need n_min >= 1 and n_boot >= 0 (got n_min={n_min}, n_boot={n_boot})")
    data = predictions if isinstance(predictions, EvalData) else load_predictions(predictions, task)
    present = [a for a, v in data.attributes.items() if any(x is not None for x in v)]
    if attributes is None:
        attrs = present
    else:
        attrs = list(attributes)
        for a in attrs:
            if a not in present:
                raise FairllavaError(f"{data.source}: attribute {a!r} is absent (or null) in all {data.n} rows; "
                                     f"available: {', '.join(present) or 'none'}")
    attr_values = {a: data.attributes[a] for a in attrs}
    if intersections and len(attrs) >= 2:
        attrs = attrs + add_intersections(attr_values, list(attrs))
    dirs = [as_direction(d) for d in directions]
    doubled = sorted({d.attribute for d in dirs if sum(e.attribute == d.attribute for e in dirs) > 1})
    if doubled:
        raise FairllavaError(f"--direction: attribute {doubled[0]!r} has more than one direction; give one per attribute")
    for d in dirs:
        if d.attribute not in attr_values:
            raise FairllavaError(f"{data.source}: --direction {d.spec} names attribute {d.attribute!r}, which is not "
                                 f"evaluated (attributes: {', '.join(attrs)})")
        check_direction(d, attr_values, data.source)
    mstats, skipped, extra = build_metrics(data, task, metrics, labels, scorers, rate_labels)
    gis = {a: group_index(a, attr_values[a], n_min) for a in attrs}
    ones = np.ones((1, data.n))
    use_clusters = cluster is not False and cluster != "none" and data.group_ids is not None
    clusters = cluster_inverse(data.group_ids) if use_clusters else None

    overall, ci_overall = {}, {}
    groups = {a: {g: {"n": int(len(gi.groups[g]))} for g in gi.groups} for a, gi in gis.items()}
    ci_groups = {a: {g: {} for g in gi.groups} for a, gi in gis.items()}
    gap, es, esf, worst, std = ({a: {} for a in attrs} for _ in range(5))
    ci_gap, ci_es, ci_esf = ({a: {} for a in attrs} for _ in range(3))
    replicates: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    cells = [(OVERALL, m) for m in mstats] + [(a, m) for a in attrs for m in mstats]
    bar = _progress(progress, len(cells) if n_boot else 0)
    for attr, m in cells:
        metric = mstats[m]
        gi = None if attr == OVERALL else gis[attr]
        point = frame_scores(metric, ones, gi)
        boot = None
        if n_boot:
            strata = gi.strata() if (gi is not None and bootstrap == "stratified") else None
            boot = bootstrap_scores(lambda W: frame_scores(metric, W, gi), data.n, n_boot,
                                    rng_for(seed, run, attr, m), strata, clusters)
            replicates[(attr, m)] = {k: boot[k] for k in ("all", "gap", "es", "es_fairclip") if k in boot}
            bar.advance()
        if gi is None:
            overall[m] = _f(point["all"][0])
            ci_overall[m] = percentile_ci(boot["all"]) if boot else None
            continue
        for j, g in enumerate(gi.groups):
            groups[attr][g][m] = _f(point["groups"][0, j])
            ci_groups[attr][g][m] = percentile_ci(boot["groups"][:, j]) if boot else None
        gap[attr][m], es[attr][m], esf[attr][m] = _f(point["gap"][0]), _f(point["es"][0]), _f(point["es_fairclip"][0])
        std[attr][m] = _f(point["std"][0])
        eligible_vals = {g: groups[attr][g][m] for g in gi.eligible if groups[attr][g][m] is not None}
        worst[attr][m] = ({"group": min(eligible_vals, key=eligible_vals.get), "value": min(eligible_vals.values())}
                          if eligible_vals else None)
        ci_gap[attr][m] = percentile_ci(boot["gap"]) if boot else None
        ci_es[attr][m] = percentile_ci(boot["es"]) if boot else None
        ci_esf[attr][m] = percentile_ci(boot["es_fairclip"]) if boot else None
    bar.close()
    inference = _inference(data, mstats, gis, attr_values, dirs, extra.get("label"), use_clusters, n_boot, n_perm,
                           seed, run, ci_method)

    per_sample = []
    for i, rid in enumerate(data.ids):
        row: dict[str, Any] = {"id": rid}
        for a in attrs:
            row.setdefault("attributes", {})[a] = attr_values[a][i]
        for k, col in extra.items():
            row[k] = col[i]
        for m, ms in mstats.items():
            if ms.per_sample is not None:
                row[m] = float(ms.per_sample[i])
        per_sample.append(row)

    meta = {
        "task": task, "source": data.source, "n_samples": data.n, "data_hash": data.data_hash,
        "attributes": attrs, "intersections": intersections, "n_min": n_min, "n_resamples": n_boot,
        "bootstrap": bootstrap, "ci": "percentile 2.5/97.5", "seed": seed, "run": run,
        "seed_scheme": "numpy SeedSequence(seed, spawn_key=(stable_hash(run, attribute, metric),)); attribute "
                       f"{OVERALL!r} for overall CIs",
        "es_variant": es_variant, "scale": "percent (0-100)", "gap": "max - min over groups with n >= n_min",
        "es": "M_all / (1 + gap)" if es_variant == "maxmin" else "M_all / (1 + sum_g |M_g - M_all|)",
        "missing_values": "excluded from that attribute's groups, counted in overall",
        "metrics": {m: dict(ms.meta, level=ms.level) for m, ms in mstats.items()},
        "skipped_metrics": skipped, "versions": _versions(),
        "resampling": (f"cluster: whole group_id clusters ({len(set(data.group_ids))} clusters of {data.n} samples)"
                       if use_clusters else "iid: samples (the predictions carry no group_id)"),
        "max_min_gap_note": "the max-min gap is never negative, so its bootstrap CI is biased upward near 0 and "
                            "essentially never contains 0; use signed_gap (direction fixed in advance) and "
                            "p_all_groups_equal for inference",
        "signed_gap": {"definition": "M(advantaged) - M(disadvantaged); for lower-is-better rates the reverse, so > 0 "
                                     "means the disadvantaged group is worse off",
                       "ci": f"{ci_method} bootstrap stratified by group over units", "n_permutations": n_perm,
                       "p_value": "two-sided permutation of group labels among units within task-label strata; "
                                  "p_one_sided: H1 signed gap > 0",
                       "directions": [d.to_dict() for d in dirs]},
        "p_all_groups_equal": "permutation of group labels among units (within task-label strata), statistic max-min",
    }
    log.info("evaluated %d samples, %d metrics, %d attributes", data.n, len(mstats), len(attrs))
    res = FairnessResult(
        task=task, metrics=list(mstats), attributes=attrs, overall=overall, groups=groups, gap=gap, es=es,
        es_fairclip=esf, worst=worst, std=std, excluded={a: gi.excluded for a, gi in gis.items()},
        n_missing={a: gi.n_missing for a, gi in gis.items()},
        ci={"overall": ci_overall, "groups": ci_groups, "gap": ci_gap, "es": ci_es, "es_fairclip": ci_esf},
        es_variant=es_variant, n=data.n, per_sample=per_sample, meta=meta, skipped=skipped,
        data=data, metric_stats=mstats, group_index=gis, replicates=replicates, attribute_values=attr_values,
        signed_gap=inference[0], p_all_equal=inference[1], directions=dirs)
    if stratified and len([a for a in attrs if "&" not in a]) >= 2:
        from .stratified import stratified_gaps

        res.stratified = stratified_gaps(res, n_min=stratified_n_min)
    return res


def _inference(data: EvalData, mstats: dict, gis: dict, attr_values: dict, dirs: list, labels, use_clusters: bool,
               n_boot: int, n_perm: int, seed: int, run: str, ci_method: str) -> tuple[dict, dict]:
    """Signed gaps for every direction x metric and the all-groups-equal permutation p for every attribute x metric."""
    from .permutation import all_groups_equal_pvalue
    from .signed import signed_gap

    clusters = data.group_ids if use_clusters else None
    signed: dict = {}
    for d in dirs:
        cells = signed.setdefault(d.attribute, {})
        for m, ms in mstats.items():
            cells[m] = signed_gap(ms, attr_values[d.attribute], d, clusters=clusters, labels=labels, n_boot=n_boot,
                                  n_perm=n_perm, seed=seed, ci_method=ci_method, run=run)
    p_equal: dict = {}
    if n_perm:
        for a, gi in gis.items():
            p_equal[a] = {m: all_groups_equal_pvalue(ms, attr_values[a], gi.eligible, clusters=clusters, labels=labels,
                                                     n_perm=n_perm, rng=rng_for(seed, run, a, f"{m}:all-equal"))
                          for m, ms in mstats.items()}
    return signed, p_equal


class _NullBar:
    def advance(self) -> None: ...
    def close(self) -> None: ...


class _RichBar:
    def __init__(self, total: int):
        from rich.progress import Progress

        self._p = Progress(transient=True)
        self._p.start()
        self._t = self._p.add_task("bootstrap", total=total)

    def advance(self) -> None:
        self._p.advance(self._t)

    def close(self) -> None:
        self._p.stop()


def _progress(enabled: bool, total: int):
    return _RichBar(total) if enabled and total else _NullBar()
