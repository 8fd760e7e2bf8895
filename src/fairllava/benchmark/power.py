"""Power of the final comparison, computed from a (selection) leaderboard's own variances (docs/protocol.md §5).

Why: the number of test seeds and the test size must be chosen so that the effect the benchmark is meant to see
— a method that halves the baseline's signed gap — is detected with >= 80 % power by the pooled test, and that
is a calculation, not a hope. Model (the random-effects estimator the leaderboard uses):

    d_s = gap_base,s − gap_method,s,   Var(d̄) = τ_d² / S + σ_d² (n0 / n) / S

with τ_d² the between-seed variance and σ_d² the within-seed sampling variance of the paired difference at the
selection's test size n0 per cell (both read from the leaderboard's paired effects; when a cell has none, twice
the baseline's own variance, which credits no pairing). Under H1 the true d is half the baseline's pooled gap;
power = F(d / SE − c) with c the 1−α/(2m) quantile of F and m the primary family's size (Holm's first step, i.e.
conservative). F is the reference distribution the pooled test uses: the normal when τ_d² = 0, else Student t
with S − 1 df (``fairness.pooling.random_effects``: with a diagonal sampling covariance its Satterthwaite df is
exactly S − 1 whenever τ² > 0), so a few seeds with between-seed spread cost what they cost in the test.
"""
from __future__ import annotations

import math
from statistics import median
from typing import Optional, Sequence

from ..errors import FairllavaError


def family_size_of(plans) -> int:
    """The primary family of the final comparison: every non-baseline primary method of any of the final plans
    (one per task) x every task that has the primary strength, i.e. what the joint leaderboard Holm-adjusts; a
    method one task's plan leaves out still counts there (as p = 1, ``verdict.not_run_members``)."""
    methods: list = []
    for p in plans:
        methods += [m for m in (p.primary.methods or [m for m in p.methods if m != p.baseline]) if m not in methods]
    return len(methods) * sum(1 for p in plans for spec in p.tasks.values() if p.primary.strength in spec.strengths)


def _components(cell: dict) -> Optional[tuple[float, float]]:
    """(τ², σ²) of one pooled quantity from its SE and τ² (SE² = τ²/S + σ²/S for equal per-seed variances)."""
    se, tau2, S = cell.get("se"), cell.get("tau2"), len(cell.get("seeds") or [])
    if se is None or tau2 is None or S < 1:
        return None
    return tau2, max(0.0, (se ** 2 - tau2 / S) * S)


def power_table(board: dict, task: str, *, seeds: Sequence[int] = (3, 4, 5, 6, 8, 10),
                n_per_cell: Sequence[int] = (50, 100, 200), alpha: Optional[float] = None,
                family_size: Optional[int] = None, effect_fraction: float = 0.5) -> dict:
    """Power for each (seeds, n per cell) to detect a ``effect_fraction`` reduction of the baseline's gap."""
    from scipy.stats import norm
    from scipy.stats import t as student

    plan = board["plan"]
    strength = float(plan["primary"]["strength"])
    rows = [r for r in board["rows"] if r["task"] == task and r["strength"] == strength]
    base = next((r for r in rows if r["method"] == board["baseline"]), None)
    if base is None:
        raise FairllavaError(f"power: the leaderboard has no {board['baseline']} row for {task} at S = {strength:g}")
    m = base["primary_metric"]
    gap = base["metrics"][m]["signed_gap"]
    if gap["value"] is None or _components(gap) is None:
        raise FairllavaError(f"power: {task}: the baseline's pooled gap has no variance (n_boot = 0 or one seed?)")
    comps = [_components(r["vs_baseline"]["metrics"][m]["signed_gap"]) for r in rows if r.get("vs_baseline")]
    comps = [c for c in comps if c is not None]
    if comps:
        tau2, sigma2, source = median(c[0] for c in comps), median(c[1] for c in comps), "paired effects (median)"
    else:
        t, s = _components(gap)
        tau2, sigma2, source = 2 * t, 2 * s, "2 x the baseline's own variance (no paired runs)"
    n0 = int(plan["tasks"][task]["data"]["n_val_per_cell" if base["split"] == "val" else "n_test_per_cell"])
    a = alpha if alpha is not None else float(board["alpha"])
    fam = family_size or max(1, int(board.get("family", {}).get("size") or 1))
    z = float(norm.ppf(1 - a / (2 * fam)))
    d = effect_fraction * gap["value"]
    table = []
    for n in n_per_cell:
        for S in seeds:
            se = math.sqrt(tau2 / S + sigma2 * (n0 / n) / S)
            if tau2 > 0 and S > 1:
                crit = float(student.ppf(1 - a / (2 * fam), S - 1))
                power = float(student.cdf(abs(d) / se - crit, S - 1)) if se > 0 else None
            else:
                crit, power = z, (float(norm.cdf(abs(d) / se - z)) if se > 0 else None)  # no variance: undefined
            table.append({"seeds": S, "n_per_cell": n, "se": se, "critical": crit, "power": power})
    return {"task": task, "metric": m, "baseline_gap": gap["value"], "effect": d, "tau2": tau2, "sigma2": sigma2,
            "n0_per_cell": n0, "variance_source": source, "alpha": a, "family_size": fam, "z": z, "table": table}


def design_power(board: dict) -> list[dict]:
    """Per task: the power of the design this leaderboard ran (its seeds and size per cell), from its own
    variances. Why: protocol §7 sizes the final design from two selection seeds; the final board says what power
    it actually had, so "not distinguishable" can be read as "cannot tell at this power", never as "no effect"."""
    out = []
    strength = float(board["plan"]["primary"]["strength"])
    for task, spec in board["plan"]["tasks"].items():
        base = next((r for r in board["rows"] if (r["task"], r["strength"], r["method"]) ==
                     (task, strength, board["baseline"])), None)
        if base is None or not base.get("seeds"):
            continue
        n = int(spec["data"]["n_val_per_cell" if base["split"] == "val" else "n_test_per_cell"])
        try:
            res = power_table(board, task, seeds=(len(base["seeds"]),), n_per_cell=(n,))
        except FairllavaError:
            continue
        out.append({**res, **res["table"][0]})
    return out


def design_power_text(res: dict) -> str:
    power = "undefined (no variance)" if res["power"] is None else f"{100 * res['power']:.0f} %"
    return (f"{res['task']}: power {power} to detect a halving of the baseline's signed {res['metric']} gap "
            f"({res['baseline_gap']:.1f} → {res['baseline_gap'] - res['effect']:.1f}) with this design "
            f"({res['seeds']} seed{'' if res['seeds'] == 1 else 's'} × {res['n_per_cell']} per cell; α = {res['alpha']:g} / {res['family_size']}, "
            f"{'Student t, ' + str(res['seeds'] - 1) + ' df' if res['tau2'] > 0 else 'normal'} reference; "
            f"variances from this leaderboard's {res['variance_source']})")


def power_markdown(res: dict) -> str:
    seeds = sorted({r["seeds"] for r in res["table"]})
    ns = sorted({r["n_per_cell"] for r in res["table"]})
    get = {(r["n_per_cell"], r["seeds"]): r["power"] for r in res["table"]}
    lines = [f"Power to detect a reduction of {res['task']}'s baseline signed {res['metric']} gap "
             f"({res['baseline_gap']:.1f}) by {res['effect']:.1f} points; τ² = {res['tau2']:.2f}, σ² = "
             f"{res['sigma2']:.2f} at {res['n0_per_cell']} per cell ({res['variance_source']}); two-sided α = "
             f"{res['alpha']:g} / {res['family_size']} (Holm's first step); reference "
             f"{'Student t, S − 1 df' if res['tau2'] > 0 else 'normal'}.", "",
             "| n per cell | " + " | ".join(f"{s} seeds" for s in seeds) + " |",
             "|---|" + "---|" * len(seeds)]
    for n in ns:
        lines.append(f"| {n} | " + " | ".join("–" if get[(n, s)] is None else f"{100 * get[(n, s)]:.0f} %"
                                              for s in seeds) + " |")
    return "\n".join(lines) + "\n"
