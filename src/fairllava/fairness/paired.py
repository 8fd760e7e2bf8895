"""Paired comparison of two systems on the same samples: difference of signed gaps and exact McNemar tests.

Why paired: two fine-tunes of one base model get most samples right or wrong together, so the difference of
their gaps varies far less than either gap; resampling and permuting both systems' outputs *per sample*
uses that. The statistic is ``d = Δs(baseline) − Δs(method)`` (positive: the method narrowed the gap).

- CI: the same stratified unit bootstrap draws for both systems (BCa by default).
- p-value: paired permutation — each unit's two outputs are swapped between the systems with probability 1/2
  (exact under "the systems are exchangeable"); one-sided ``p_value`` for d > 0 and ``p_two_sided``.
- McNemar: per group, the exact binomial test on the discordant samples of a per-sample 0/1 outcome
  (correct answer; a false positive for the rate test). It treats samples as independent.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..metrics.base import MetricStats
from .bootstrap import iter_resample_weights
from .signed import (Direction, GapEngine, _f, as_direction, as_metric, check_direction, interval, stream)
from .units import build_units, permutation_pvalue

CHUNK = 200


def paired_signed_gap(baseline: MetricStats | Sequence[float], method: MetricStats | Sequence[float],
                      values: Sequence[str | None], direction: Direction | str | tuple[str, str], *,
                      clusters: Sequence | None = None, labels: Sequence | None = None, n_boot: int = 1000,
                      n_perm: int = 1000, seed: int = 0, level: float = 0.95, ci_method: str = "bca",
                      run: str = "fairllava", replicates: bool = False) -> dict:
    """``d = Δs(baseline) − Δs(method)`` on the same samples, with paired bootstrap CI and paired permutation p.

    ``baseline``/``method``: per-sample scores or MetricStats over the *same* samples in the same order.
    With ``replicates=True`` the bootstrap replicates of d are returned under ``"_replicates"`` (for pooling).
    """
    d = Direction("", *direction, "tuple") if isinstance(direction, tuple) else as_direction(direction)
    ma, mb = as_metric(baseline), as_metric(method)
    if ma.n != mb.n:
        raise ValueError(f"baseline has {ma.n} samples, method {mb.n}; they must be the same samples")
    check_direction(d, list(values), "paired_signed_gap")
    units = build_units(values, [d.advantaged, d.disadvantaged], clusters, labels)
    ea, eb = GapEngine(ma, units), GapEngine(mb, units)
    key = (run, "paired", d.attribute, ma.name, d.advantaged, d.disadvantaged)
    ra = rb = null = None
    if n_boot:
        rng = stream(seed, *key, "boot")
        ra, rb = [], []
        for W in iter_resample_weights(units.n_units, n_boot, rng, [units.members(0), units.members(1)]):
            ra.append(ea.weighted(W))
            rb.append(eb.weighted(W))
        ra, rb = np.concatenate(ra), np.concatenate(rb)
    if n_perm:
        null = swap_null(ea, eb, n_perm, stream(seed, *key, "perm"))
    out = paired_summary(d, ea, eb, units, ra, rb, null, level, ci_method)
    if replicates and ra is not None:
        out["_replicates"] = ra - rb
    return out


def paired_summary(d: Direction, ea: GapEngine, eb: GapEngine, units, ra: np.ndarray | None, rb: np.ndarray | None,
                   null: np.ndarray | None, level: float, ci_method: str) -> dict:
    """The result row of a paired comparison from its bootstrap replicates ``ra``/``rb`` and swap ``null``."""
    ga, gb = ea.point(), eb.point()
    diff = ga - gb
    out = {"advantaged": d.advantaged, "disadvantaged": d.disadvantaged, "baseline": _f(ga), "method": _f(gb),
           "diff": _f(diff), "ci": None, "baseline_ci": None, "method_ci": None, "p_value": None,
           "p_two_sided": None, "resampling": units.resampling, "ci_method": ci_method, "level": level,
           "n_boot": 0 if ra is None else len(ra), "n_perm": 0 if null is None else len(null), "n_units": units.n_units,
           "test": "paired permutation (swap the systems' outputs per unit), H1: method has the smaller signed gap"}
    if ra is not None:
        ja, jb = ea.jackknife(), eb.jackknife()
        out["ci"] = interval(ra - rb, diff, ja - jb, level, ci_method)
        out["baseline_ci"] = interval(ra, ga, ja, level, ci_method)
        out["method_ci"] = interval(rb, gb, jb, level, ci_method)
    if null is not None:
        out["p_value"] = permutation_pvalue(diff, null)
        out["p_two_sided"] = permutation_pvalue(abs(diff), np.abs(null))
    return out


def swap_null(ea: GapEngine, eb: GapEngine, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """Null replicates of ``Δs_A − Δs_B`` when each unit's outputs are swapped between A and B with prob. 1/2."""
    adv = ea.adv
    D = eb.S - ea.S
    out = []
    for start in range(0, n_perm, CHUNK):
        b = min(CHUNK, n_perm - start)
        s = (rng.random((b, len(adv))) < 0.5).astype(np.float64)
        ga = _swapped(ea, adv, s, D, +1.0)
        gb = _swapped(eb, adv, s, D, -1.0)
        out.append(ga - gb)
    return np.concatenate(out)


def _swapped(eng: GapEngine, adv: np.ndarray, s: np.ndarray, D: np.ndarray, sign: float) -> np.ndarray:
    """Gap of ``eng``'s system after the swaps ``s``: its own unit sums plus ``sign * s * (S_B − S_A)``."""
    tot_a = adv @ eng.S
    tot_d = (1 - adv) @ eng.S
    sa = tot_a[None, :] + sign * ((s * adv) @ D)
    sd = tot_d[None, :] + sign * ((s * (1 - adv)) @ D)
    n_a = np.full(len(s), adv @ eng.n)
    n_d = np.full(len(s), (1 - adv) @ eng.n)
    return eng.sign * (eng.reduce(sa, n_a) - eng.reduce(sd, n_d))


def mcnemar_exact(outcome_a: Sequence[bool], outcome_b: Sequence[bool], better: str = "higher") -> dict:
    """Exact McNemar test of paired 0/1 outcomes (A = baseline, B = method) on the same samples.

    ``better="higher"``: 1 is good (a correct answer), H1 B has more 1s; ``"lower"``: 1 is bad (a false
    positive), H1 B has fewer. Returns the discordant counts, one-sided ``p_value`` and ``p_two_sided``.
    """
    from scipy.stats import binomtest

    a = np.asarray(outcome_a, dtype=bool)
    b = np.asarray(outcome_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"outcomes differ in shape: {a.shape} vs {b.shape}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = only_a + only_b
    improved = only_b if better == "higher" else only_a
    if n == 0:
        p1 = p2 = 1.0
    else:
        p1 = float(binomtest(improved, n, 0.5, alternative="greater").pvalue)
        p2 = float(binomtest(improved, n, 0.5, alternative="two-sided").pvalue)
    return {"n": int(len(a)), "only_baseline": only_a, "only_method": only_b, "rate_baseline": _rate(a),
            "rate_method": _rate(b), "p_value": p1, "p_two_sided": p2,
            "test": f"exact McNemar (binomial on discordant pairs), H1: method {'more' if better == 'higher' else 'fewer'}"}


def _rate(x: np.ndarray) -> float | None:
    return float(100.0 * x.mean()) if len(x) else None


def mcnemar_by_group(outcome_a: Sequence[bool], outcome_b: Sequence[bool], values: Sequence[str | None],
                     eligible: Sequence[bool] | None = None, better: str = "higher") -> dict[str, dict]:
    """:func:`mcnemar_exact` within each group of ``values`` (samples with ``eligible`` False left out)."""
    a, b = np.asarray(outcome_a, dtype=bool), np.asarray(outcome_b, dtype=bool)
    ok = np.ones(len(a), dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    out = {}
    for g in sorted({v for v in values if v is not None}):
        idx = np.array([i for i, v in enumerate(values) if v == g and ok[i]], dtype=np.int64)
        out[g] = mcnemar_exact(a[idx], b[idx], better)
    return out
