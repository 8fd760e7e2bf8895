"""Signed gap between two groups named in advance, with a bootstrap CI and a permutation p-value.

Why: the paper's max−min gap is never negative, so its bootstrap CI essentially never contains 0 and tests on
it have little power (EVALUATION §5.2b). A *signed* gap between an advantaged and a disadvantaged group that
were fixed before looking at the evaluated data (from the user, a datacard or another split) is an ordinary
difference of two group scores: unbiased, can be 0 or negative, and has an honest CI.

``Δs = M(advantaged) − M(disadvantaged)`` for a metric where higher is better, and
``Δs = M(disadvantaged) − M(advantaged)`` for an error rate (``higher_is_better=False`` in the metric's meta,
e.g. the false-positive rate of a named label), so **Δs > 0 always means the disadvantaged group is worse off**.

- CI: bootstrap stratified by group over units (whole ``group_id`` clusters when given, samples otherwise),
  BCa by default (percentile on request).
- p-value: permutation of the group labels among units, within strata of the task label (units with the same
  label multiset), so a group with more hard cases does not count as unfairness. Two-sided ``p_value`` for
  Δs = 0 and ``p_one_sided`` for Δs > 0.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import FairllavaError
from ..io import stable_hash
from ..metrics.base import MetricStats, mean_metric
from .bootstrap import bca_ci, iter_resample_weights, percentile_ci
from .units import Units, build_units, permutation_pvalue, stratified_permutations

CI_METHODS = ("bca", "percentile")
#: The metric a direction is read from (``--direction-from``) and the default primary endpoint, per task.
KEY_METRIC = {"vqa": "accuracy", "report": "bleu4"}


@dataclass(frozen=True)
class Direction:
    """``attribute``: ``advantaged`` > ``disadvantaged``, fixed before the evaluated data are seen."""

    attribute: str
    advantaged: str
    disadvantaged: str
    source: str = "user"

    def __post_init__(self) -> None:
        if self.advantaged == self.disadvantaged:
            raise FairllavaError(f"direction {self.spec}: the two groups must differ")

    @property
    def spec(self) -> str:
        return f"{self.attribute}={self.advantaged}>{self.disadvantaged}"

    def to_dict(self) -> dict:
        return {"attribute": self.attribute, "advantaged": self.advantaged, "disadvantaged": self.disadvantaged,
                "source": self.source}


_SPEC = re.compile(r"^\s*([^=<>]+?)\s*=\s*([^=<>]+?)\s*([<>])\s*([^=<>]+?)\s*$")


def parse_direction(spec: str, source: str = "--direction") -> Direction:
    """``"race=light>dark"`` (light advantaged) or ``"race=dark<light"`` -> :class:`Direction`."""
    m = _SPEC.match(spec or "")
    if not m:
        raise FairllavaError(f"{source} {spec!r}: expected ATTRIBUTE=ADVANTAGED>DISADVANTAGED, e.g. race=light>dark")
    attr, left, op, right = m.groups()
    adv, dis = (left, right) if op == ">" else (right, left)
    return Direction(attr, adv, dis, source)


def as_direction(d: Direction | str | Mapping) -> Direction:
    if isinstance(d, Direction):
        return d
    if isinstance(d, str):
        return parse_direction(d)
    if isinstance(d, Mapping):
        try:
            return Direction(str(d["attribute"]), str(d["advantaged"]), str(d["disadvantaged"]),
                             str(d.get("source", "mapping")))
        except KeyError as e:
            raise FairllavaError(f"direction {dict(d)}: missing key {e}") from None
    raise FairllavaError(f"direction: expected 'attr=adv>dis' or a Direction, got {type(d).__name__}")


def directions_from_datacard(card: Mapping | str | os.PathLike) -> list[Direction]:
    """Directions a datacard declares: ``directions: [{attribute, advantaged, disadvantaged}]``, or the shortcut
    benchmark's ``shortcut: {attribute, minority}`` (the minority is disadvantaged by construction)."""
    source = "datacard"
    if not isinstance(card, Mapping):
        source = str(card)
        try:
            card = json.loads(Path(card).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise FairllavaError(f"{source}: cannot read the datacard ({e})") from None
    out = [as_direction({**d, "source": source}) for d in card.get("directions", [])]
    sc = card.get("shortcut")
    if sc and sc.get("attribute") and sc.get("minority"):
        attr, minority = sc["attribute"], sc["minority"]
        classes = [c for c in (card.get("attributes", {}).get(attr, {}).get("classes") or []) if c != minority]
        if len(classes) != 1:
            raise FairllavaError(f"{source}: shortcut attribute {attr!r} needs exactly one non-minority class to "
                                 f"name the advantaged group, got {classes}")
        if not any(d.attribute == attr for d in out):
            out.append(Direction(attr, classes[0], minority, f"{source} (shortcut minority)"))
    if not out:
        raise FairllavaError(f"{source}: declares no direction (no 'directions' and no 'shortcut' minority)")
    return out


def directions_from_file(predictions, task: str = "report", attributes: Sequence[str] | None = None,
                         metric: str | None = None, n_min: int = 20, labels=None) -> list[Direction]:
    """Directions seen in *another* predictions file (e.g. the validation split): per attribute its best eligible
    group is advantaged and its worst disadvantaged, on ``metric`` (default :data:`KEY_METRIC`). Attributes with
    fewer than 2 eligible groups are skipped unless named in ``attributes``."""
    from .evaluate import evaluate_predictions

    metric = metric or KEY_METRIC[task]
    res = evaluate_predictions(predictions, task, attributes=attributes, n_boot=0, n_perm=0, n_min=n_min,
                               labels=labels, metrics=[metric], cluster=False)
    if metric not in res.metric_stats:
        raise FairllavaError(f"{predictions}: metric {metric!r} unavailable ({res.skipped.get(metric, 'not computed')})")
    hib = res.metric_stats[metric].meta.get("higher_is_better", True)
    out = []
    for attribute in res.attributes:
        if "&" in attribute:
            continue
        vals = {g: res.groups[attribute][g].get(metric) for g in res.group_index[attribute].eligible}
        vals = {g: v for g, v in vals.items() if v is not None}
        if len(vals) < 2 or max(vals.values()) == min(vals.values()):
            if attributes is not None:
                raise FairllavaError(f"{predictions}: {attribute} has no two groups with n >= {n_min} and different "
                                     f"{metric}; cannot read a direction from it")
            continue
        best, worst = (max, min) if hib else (min, max)
        adv, dis = best(vals, key=vals.get), worst(vals, key=vals.get)
        out.append(Direction(attribute, adv, dis,
                             f"{predictions} ({metric}: {adv} {vals[adv]:.2f} vs {dis} {vals[dis]:.2f})"))
    if not out:
        raise FairllavaError(f"{predictions}: no attribute with two groups of n >= {n_min} to read a direction from")
    return out


def direction_from_file(predictions, attribute: str, task: str = "report", metric: str | None = None,
                        n_min: int = 20, labels=None) -> Direction:
    """:func:`directions_from_file` for one attribute."""
    return directions_from_file(predictions, task, [attribute], metric, n_min, labels)[0]


def check_direction(d: Direction, values: Mapping[str, Sequence] | Sequence, source: str) -> None:
    """Both groups of ``d`` must occur in the data (``values``: attribute -> per-sample values, or one column)."""
    col = values.get(d.attribute) if isinstance(values, Mapping) else values
    if col is None:
        raise FairllavaError(f"{source}: direction {d.spec} names attribute {d.attribute!r}, absent from the data")
    present = sorted({v for v in col if v is not None})
    for g in (d.advantaged, d.disadvantaged):
        if g not in present:
            raise FairllavaError(f"{source}: direction {d.spec} names group {d.attribute}={g!r}, absent from the "
                                 f"data (groups: {', '.join(present) or 'none'})")


# ---------------------------------------------------------------------------------------------- rate metric

def rate_metric(predicted: Sequence[str], true: Sequence[str], label: str) -> MetricStats:
    """False-positive rate of ``label`` (percent): among samples whose true label is not ``label``, the share
    answered ``label``. Why: a shortcut shows as one group's non-``label`` cases answered ``label`` (the
    demo's shortcut signature); accuracy dilutes it because the same shortcut makes true positives right."""
    lab = label.strip().upper()
    elig = np.array([str(t).strip().upper() != lab for t in true], dtype=np.float64)
    hit = np.array([str(p).strip().upper() == lab for p in predicted], dtype=np.float64) * elig
    return MetricStats(f"fpr_{lab}", np.stack([hit, elig], 1), _rate_reduce, "rate", None,
                       {"variant": f"false-positive rate of {lab}: #(answered {lab} & true != {lab}) / #(true != {lab})",
                        "scale": "percent", "level": "rate", "higher_is_better": False, "label": lab})


def _rate_reduce(sums: np.ndarray, n: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sums[..., 1] > 0, 100.0 * sums[..., 0] / np.where(sums[..., 1] > 0, sums[..., 1], 1), np.nan)


# ---------------------------------------------------------------------------------------------- engine

def as_metric(metric: MetricStats | Sequence[float] | np.ndarray, name: str = "score") -> MetricStats:
    """A MetricStats, or per-sample scores in percent (their group value is the mean)."""
    return metric if isinstance(metric, MetricStats) else mean_metric(name, np.asarray(metric, dtype=np.float64))


def orientation(metric: MetricStats) -> float:
    return 1.0 if metric.meta.get("higher_is_better", True) else -1.0


class GapEngine:
    """Signed gap of one metric on unit-weight rows ``W[B, U]`` (group 0 advantaged, 1 disadvantaged)."""

    def __init__(self, metric: MetricStats, units: Units):
        self.reduce = metric.reduce
        self.sign = orientation(metric)
        self.S = units.sums(metric.stats)
        self.n = units.counts()
        self.adv = (units.group == 0).astype(np.float64)

    def from_masks(self, A: np.ndarray, D: np.ndarray, S: np.ndarray | None = None) -> np.ndarray:
        """Gap when ``A``/``D`` ``[B, U]`` weight the units counted as advantaged/disadvantaged."""
        S = self.S if S is None else S
        m_adv = self.reduce(A @ S, A @ self.n)
        m_dis = self.reduce(D @ S, D @ self.n)
        return self.sign * (m_adv - m_dis)

    def weighted(self, W: np.ndarray) -> np.ndarray:
        return self.from_masks(W * self.adv, W * (1.0 - self.adv))

    def point(self) -> float:
        return float(self.weighted(np.ones((1, len(self.n))))[0])

    def jackknife(self) -> np.ndarray:
        """Leave-one-unit-out gaps ``[U]`` (for the BCa acceleration)."""
        tot_a, tot_d = self.adv @ self.S, (1 - self.adv) @ self.S
        n_a, n_d = self.adv @ self.n, (1 - self.adv) @ self.n
        a = self.adv[:, None]
        sa = tot_a[None, :] - a * self.S
        sd = tot_d[None, :] - (1 - a) * self.S
        na = n_a - self.adv * self.n
        nd = n_d - (1 - self.adv) * self.n
        return self.sign * (self.reduce(sa, na) - self.reduce(sd, nd))


def interval(samples: np.ndarray, point: float, jackknife: np.ndarray, level: float, method: str):
    if method not in CI_METHODS:
        raise ValueError(f"ci_method must be one of {CI_METHODS}, got {method!r}")
    return bca_ci(samples, point, jackknife, level) if method == "bca" else percentile_ci(samples, level)


def stream(seed: int, *key: Any) -> np.random.Generator:
    """A reproducible stream per statistic (EVALUATION §5.2 seed scheme, one key per use)."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(stable_hash(*key),)))


def _f(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def signed_gap(metric: MetricStats | Sequence[float], values: Sequence[str | None],
               direction: Direction | str | tuple[str, str], *, clusters: Sequence | None = None,
               labels: Sequence | None = None, n_boot: int = 1000, n_perm: int = 1000, seed: int = 0,
               level: float = 0.95, ci_method: str = "bca", run: str = "fairllava") -> dict:
    """Signed gap of ``metric`` between the two groups of ``direction`` among per-sample group ``values``.

    ``metric``: a :class:`~fairllava.metrics.base.MetricStats` (corpus metrics are recomputed on each group) or
    per-sample scores in percent. ``direction``: a :class:`Direction`, ``"attr=adv>dis"`` or ``(adv, dis)``.
    ``clusters``: per-sample ``group_id`` (patients are resampled/permuted whole); ``labels``: per-sample task
    labels (permutation strata). Returns the ``metrics.json`` cell ``{advantaged, disadvantaged, value, ci,
    p_value}`` plus ``p_one_sided`` (H1: Δs > 0), group sizes, unit counts and the methods used.
    """
    d = Direction("", *direction, "tuple") if isinstance(direction, tuple) else as_direction(direction)
    ms = as_metric(metric)
    check_direction(d, list(values), "signed_gap")
    units = build_units(values, [d.advantaged, d.disadvantaged], clusters, labels)
    eng = GapEngine(ms, units)
    point = eng.point()
    out = {"advantaged": d.advantaged, "disadvantaged": d.disadvantaged, "value": _f(point), "ci": None,
           "p_value": None, "p_one_sided": None,
           "n_advantaged": int(np.sum(units.group[units.inverse] == 0)),
           "n_disadvantaged": int(np.sum(units.group[units.inverse] == 1)),
           "units": {"advantaged": int(np.sum(units.group == 0)), "disadvantaged": int(np.sum(units.group == 1))},
           "resampling": units.resampling, "ci_method": ci_method, "level": level, "n_boot": n_boot,
           "n_perm": n_perm, "orientation": "advantaged - disadvantaged" if eng.sign > 0 else
           "disadvantaged - advantaged (lower is better)", "direction_source": d.source}
    key = (run, "signed", d.attribute, ms.name, d.advantaged, d.disadvantaged)
    if n_boot:
        rng = stream(seed, *key, "boot")
        reps = np.concatenate([eng.weighted(W) for W in
                               iter_resample_weights(units.n_units, n_boot, rng, [units.members(0), units.members(1)])])
        out["ci"] = interval(reps, point, eng.jackknife(), level, ci_method)
    if n_perm:
        rng = stream(seed, *key, "perm")
        null = []
        for P in stratified_permutations(units.stratum, n_perm, rng):
            A = (units.group[P] == 0).astype(np.float64)
            null.append(eng.from_masks(A, 1.0 - A))
        null = np.concatenate(null)
        out["p_one_sided"] = permutation_pvalue(point, null)
        out["p_value"] = permutation_pvalue(abs(point), np.abs(null))
    return out
