"""Holm adjustment over the declared primary family, and a computed one-line verdict per method.

Why computed: a verdict typed by hand drifts from the numbers. The rule (docs/protocol.md):

- endpoint: the signed gap of the task's primary metric; effect = gap reduction = gap(baseline) − gap(method),
  pooled over seeds (paired, same test samples), with its CI and the two-sided p of the pooled random-effects
  test (``fairness.pool_paired``: Student t reference when seeds disagree; per-seed permutation p's are kept
  beside it);
- family: every non-baseline method x task at the primary strength on the final split; Holm-adjusted over
  every declared member of the tasks present, a member without a p counting as p = 1 (so a missing comparison
  never makes the others' correction milder); a member that a task's own plan does not run, by design (a
  method left out of one task's final plan, docs/protocol.md §8), counts as p = 1 too and is listed on the board
  as not run, without making the verdicts provisional;
- **better** if the adjusted p < alpha and the gap shrank, **worse** if adjusted p < alpha and it grew,
  otherwise **not distinguishable**;
- **levelled down** when the gap shrank while the advantaged group's pooled value fell below the lower end of
  the baseline's CI for that group (the gap closed by the advantaged group losing more than its CI).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional

from ..errors import FairllavaError
from .stats import holm


def _neg_ci(ci: Optional[list]) -> Optional[list]:
    return None if ci is None else [-ci[1], -ci[0]]


def in_family(board: dict, plan, row: dict) -> bool:
    methods = plan.primary.methods or [m for m in plan.methods if m != plan.baseline]
    return (row["strength"] == float(plan.primary.strength) and row["split"] == board["final_split"]
            and row["entry"] in methods and row["vs_baseline"] is not None)


def apply_family(board: dict, plan, not_run: Optional[list] = None) -> None:
    """Add ``holm_p`` (family members), ``effect`` and ``verdict`` to every non-baseline row, in place.

    ``not_run``: ``task/method`` members that the task's own plan leaves out (``not_run_members``)."""
    not_run = list(not_run or [])
    family = [r for r in board["rows"] if in_family(board, plan, r)]
    methods = plan.primary.methods or [m for m in plan.methods if m != plan.baseline]
    present = {r["task"] for r in board["rows"] if r["strength"] == float(plan.primary.strength)
               and r["split"] == board["final_split"]}
    runs = [v for v, (entry, _) in plan.method_variants().items() if entry in methods]  # one per trial
    size = max(len(family), len(runs) * len(present))  # declared members of the tasks present
    pvals = [r["vs_baseline"]["metrics"][r["primary_metric"]]["signed_gap"]["p_value"] for r in family]
    adjusted = holm([1.0 if p is None else p for p in pvals] + [1.0] * (size - len(family)))
    for r, p, a in zip(family, pvals, adjusted):
        r["holm_p"] = None if p is None else a
    declared = plan.primary.family_tasks or list(plan.tasks)
    missing = [t for t in declared if t not in {r["task"] for r in board["rows"]}]
    board["family"] = {"endpoint": "signed gap of each task's primary metric", "strength": float(plan.primary.strength),
                       "split": board["final_split"], "size": size, "with_p": sum(p is not None for p in pvals),
                       "members": [f"{r['task']}/{r['method']}" for r in family], "correction": "holm",
                       "tasks": declared, "missing_tasks": missing, "not_run": not_run}
    incomplete = bool(missing and plan.primary.family_tasks)  # split over plans, and not all of them are in
    if incomplete:
        board["partial"] = True
    # verdicts are provisional while the family's comparisons are not all in: a task missing, or runs missing
    provisional = (incomplete or size - len(not_run) > len(family)
                   or bool(board.get("runs", {}).get("missing") or board.get("runs", {}).get("corrupt")))
    for r in board["rows"]:
        if r["vs_baseline"] is None:
            r["verdict"] = None
            continue
        base = next((b for b in board["rows"] if (b["task"], b["strength"], b["split"], b["method"]) ==
                     (r["task"], r["strength"], r["split"], board["baseline"])), None)
        r["verdict"] = verdict(r, base, board["alpha"], member=r in family, provisional=provisional)


def not_run_members(plans: list, methods: list) -> list[str]:
    """``task/method`` for each primary ``methods`` entry that a task's own plan does not run (at the primary
    strength): a design choice declared in that plan, not a run missing from it."""
    out = []
    for p in plans:
        for task, spec in p.tasks.items():
            if float(p.primary.strength) in spec.strengths:
                out += [f"{task}/{m}" for m in methods if m not in p.methods]
    return out


def restrict_family(board: dict, plan, methods: list[str], not_run: Optional[list] = None) -> None:
    """Holm and verdicts over a smaller family than the plans declare (protocol §7's fallback, m = 2), applied at
    report time: the final plans stay as run (their hash covers ``primary``), and the board says so."""
    others = [m for m in plan.methods if m != plan.baseline]
    bad = [m for m in methods if m not in others]
    if bad or not methods:
        raise FairllavaError(f"--primary-methods: {bad[0] if bad else '(none)'!r} is not a non-baseline method of "
                             f"the plan(s) (expected some of {', '.join(others)})")
    declared = plan.primary.methods or others
    p = copy.copy(plan)
    p.__dict__.pop("_twins", None)
    p.primary = dataclasses.replace(plan.primary, methods=list(methods))
    for r in board["rows"]:
        r.pop("holm_p", None)
    apply_family(board, p, [x for x in not_run or [] if x.split("/", 1)[1] in methods])
    board["family"]["restricted"] = {"methods": list(methods), "declared": list(declared)}


def verdict(row: dict, base: Optional[dict], alpha: float, member: bool, provisional: bool = False) -> dict:
    m = row["primary_metric"]
    eff = row["vs_baseline"]["metrics"][m]["signed_gap"]
    reduction = None if eff["value"] is None else -eff["value"]
    p = row.get("holm_p") if member else eff["p_value"]
    if p is not None and p < alpha and reduction is not None and reduction != 0:
        label = "better" if reduction > 0 else "worse"
    else:
        label = "not distinguishable"
    adv, dis = row["direction"]["advantaged"], row["direction"]["disadvantaged"]
    levelled = False
    drop = None
    if base is not None and reduction is not None and reduction > 0:
        b_ci = base["metrics"][m]["groups"][adv]["ci"]
        mine = row["metrics"][m]["groups"][adv]["value"]
        drop = row["vs_baseline"]["metrics"][m][f"group:{adv}"]["value"]
        levelled = bool(b_ci and mine is not None and mine < b_ci[0])
    ci = _neg_ci(eff["ci"])
    gap_m = row["metrics"][m]["signed_gap"]["value"]
    paired = sorted(row["vs_baseline"]["seeds"])
    if base and sorted(base["seeds"]) == paired == sorted(row["seeds"]):
        gap_b = base["metrics"][m]["signed_gap"]["value"]
    elif sorted(row["seeds"]) == paired and gap_m is not None and eff["value"] is not None:
        gap_b = gap_m - eff["value"]  # the baseline on the same seeds as the method (a partial board)
    else:
        gap_b = None
    p_name = "Holm-adjusted p" if member else "unadjusted p (not in the primary family)"
    rel = "not distinguishable from" if label == "not distinguishable" else f"{label} than"
    text = (f"{row['method']}: {rel} {row['vs_baseline']['baseline']} on {row['task']} (S = {row['strength']:g}, "
            f"{_seeds(len(row['vs_baseline']['seeds']))}): signed {m} gap {adv}−{dis} {_f(gap_b)} → {_f(gap_m)}, "
            f"reduction {_f(reduction, sign=True)} [{_f(ci[0]) if ci else '–'}, {_f(ci[1]) if ci else '–'}], "
            f"{p_name} = {'–' if p is None else f'{p:.3g}'}")
    if levelled:
        text += f"; levelled down ({adv} {_f(drop, sign=True)} points, below the {row['vs_baseline']['baseline']} CI)"
    if provisional and member:
        text = ("PROVISIONAL (not every comparison of the primary family is in yet, so Holm covers fewer than "
                "declared): " + text)
    return {"label": label, "reduction": reduction, "reduction_ci": ci, "p": p, "adjusted": member,
            "levelled_down": levelled, "advantaged_change": drop, "provisional": provisional and member,
            "text": text}


def verdict_label(v: Optional[dict]) -> str:
    """The short label of a table cell or CSV row; it never drops what qualifies the verdict."""
    if not v:
        return "–"
    label = v["label"] + (", levelled down" if v["levelled_down"] else "")
    if not v["adjusted"]:
        return label + " (outside the primary family, unadjusted)"
    return label + (" (provisional)" if v["provisional"] else "")


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def _f(v, sign: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:+.1f}" if sign else f"{v:.1f}"
