"""The leaderboard: every method x task x strength of a results folder, pooled over seeds, vs the baseline.

Why recomputed from predictions: the numbers must follow from the runs' prediction files alone (tested), with
one statistics path for every method (``stats.py``). Only finished runs count: a run folder whose files
changed after its ``DONE.json`` is listed as corrupt, by path, and never aggregated.

Per row: overall and per-group values of the primary and secondary metrics, the signed gap (advantaged −
disadvantaged; > 0 = the minority is worse off) and ES, the shortcut signature (minority false-positive rate
of the shortcut label), each pooled over seeds with a CI; the paired effect vs the baseline with the
pooled paired test's two-sided p (``fairness.pool_paired``), Holm-adjusted over the plan's primary family; the within-label leakage probe; a
computed verdict.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Optional

from ..errors import FairllavaError
from .manifest import PRUNABLE, check_done, finished
from .plan import Plan
from .runner import Step, data_dir, load_folder_plan, plan_steps
from .stats import SIGNATURE, load_seed, paired_effect, pooled, shortcut_target

LEADERBOARD_VERSION = 1
SECONDARY = {"derm-vqa": ["macro_f1"], "cxr-report": ["bleu4", "keyword_f1_macro_14"]}


def metrics_for(plan: Plan, task: str) -> list[str]:
    primary = plan.primary_metric(task)
    return [primary] + [m for m in SECONDARY[task] if m != primary] + [SIGNATURE]


def final_split(plan: Plan) -> str:
    return "test" if "test" in plan.splits else plan.splits[0]


def scan_runs(plan: Plan, out: Path) -> tuple[list[Step], list[dict], list[str]]:
    """(finished run steps, corrupt runs {path, reason}, missing run ids)."""
    ok, corrupt, missing = [], [], []
    for s in plan_steps(plan):
        if s.kind != "run":
            continue
        state, why = check_done(s.folder(out), PRUNABLE["run"])
        if finished(state):  # a committed run without its weights still holds every result
            ok.append(s)
        elif state == "corrupt":
            corrupt.append({"path": str(s.folder(out)), "reason": why})
        else:
            missing.append(s.id)
    return ok, corrupt, missing


def _direction(card: dict, attribute: str) -> tuple[str, str]:
    minority = card["shortcut"]["minority"]
    classes = card["attributes"][attribute]["classes"]
    return next(c for c in classes if c != minority), minority


def build_leaderboard(out: str | Path, log: Callable[[str], None] = print, head_to_head: Optional[str] = None) -> dict:
    """Aggregate the finished runs of a results folder into the leaderboard dict (``leaderboard.json``).

    ``head_to_head``: a method (run name) compared directly with every other non-baseline method of each cell
    (``vs_focus`` on the other rows: the focus method's gap reduction relative to that method, paired on the same
    test samples; secondary, unadjusted p), which answers "does it beat the alternatives", not only "lora"."""
    from .verdict import apply_family

    out = Path(out)
    plan = load_folder_plan(out)
    if head_to_head is not None and head_to_head not in plan.method_variants():
        raise FairllavaError(f"--head-to-head {head_to_head}: not a method of plan {plan.name} "
                             f"({', '.join(plan.method_variants())})")
    identity = json.loads((out / "benchmark.json").read_text(encoding="utf-8"))
    ok, corrupt, missing = scan_runs(plan, out)
    for c in corrupt:
        log(f"corrupt run folder {c['path']} ({c['reason']}): left out of the leaderboard; "
            "`fairllava benchmark run` re-runs it")
    ev = plan.evaluation
    cache: dict = {}

    def seed_data(s: Step):
        if s not in cache:
            data = data_dir(out, s.task, s.seed, s.strength)
            card = json.loads((data / "datacard.json").read_text(encoding="utf-8"))
            cache[s] = (load_seed(s.folder(out) / "generate" / "predictions.jsonl", data / f"{s.split}.jsonl", card,
                                  s.task, plan.attribute, metrics_for(plan, s.task), s.seed), card)
        return cache[s]

    rows = []
    cells = sorted({(s.task, s.strength, s.split) for s in ok}, key=lambda c: (list(plan.tasks).index(c[0]), -c[1], c[2]))
    for task, strength, split in cells:
        by_variant: dict[str, list[Step]] = {}
        for s in ok:
            if (s.task, s.strength, s.split) == (task, strength, split):
                by_variant.setdefault(s.variant, []).append(s)
        first = next(iter(by_variant.values()))[0]
        card = seed_data(first)[1]
        direction = _direction(card, plan.attribute)
        base_steps = {s.seed: s for s in by_variant.get(plan.baseline, [])}
        for variant in [v for v in plan.method_variants() if v in by_variant]:
            steps = sorted(by_variant[variant], key=lambda s: s.seed)
            key = f"{task}/{strength}/{split}/{variant}"
            row = {"task": task, "strength": strength, "split": split, "method": variant,
                   "entry": plan.method_variants()[variant][0], "seeds": [s.seed for s in steps],
                   "primary_metric": plan.primary_metric(task), "direction": {"advantaged": direction[0],
                                                                             "disadvantaged": direction[1]},
                   "signature_label": shortcut_target(card, task), "metrics": {}, "vs_baseline": None, "leakage": None}
            seeds = [seed_data(s)[0] for s in steps]
            for m in metrics_for(plan, task):
                kw = dict(n_boot=ev.n_boot, seed=0, level=ev.level, key=key)
                row["metrics"][m] = {
                    "overall": pooled(seeds, m, "overall", direction, **kw),
                    "groups": {g: pooled(seeds, m, f"group:{g}", direction, **kw) for g in direction},
                    "signed_gap": pooled(seeds, m, "signed_gap", direction, **kw),
                    "es": pooled(seeds, m, "es", direction, **kw),
                }
            if variant != plan.baseline:
                common = [s for s in steps if s.seed in base_steps]
                if common:
                    b = [seed_data(base_steps[s.seed])[0] for s in common]
                    mm = [seed_data(s)[0] for s in common]
                    row["vs_baseline"] = {"baseline": plan.baseline, "seeds": [s.seed for s in common], "metrics": {}}
                    for m in metrics_for(plan, task):
                        kw = dict(n_boot=ev.n_boot, n_perm=ev.n_perm, seed=0, level=ev.level, key=key + "/paired")
                        row["vs_baseline"]["metrics"][m] = {
                            q: paired_effect(b, mm, m, q, direction, **kw)
                            for q in ("signed_gap", "overall", f"group:{direction[0]}", f"group:{direction[1]}")}
            if plan.audit.enabled:
                row["leakage"] = _leakage([s.folder(out) / "audit" / "audit.json" for s in steps])
            rows.append(row)
        focus = {s.seed: s for s in by_variant.get(head_to_head, [])} if head_to_head else {}
        for row in rows:
            if not focus or (row["task"], row["strength"], row["split"]) != (task, strength, split) or \
                    row["method"] in (head_to_head, plan.baseline):
                continue
            common = [s for s in sorted(by_variant[row["method"]], key=lambda s: s.seed) if s.seed in focus]
            if not common:
                continue
            m = plan.primary_metric(task)
            kw = dict(n_boot=ev.n_boot, n_perm=ev.n_perm, seed=0, level=ev.level,
                      key=f"{task}/{strength}/{split}/{row['method']}/vs/{head_to_head}")
            other = [seed_data(s)[0] for s in common]
            mine = [seed_data(focus[s.seed])[0] for s in common]
            row["vs_focus"] = {"focus": head_to_head, "seeds": [s.seed for s in common], "metric": m,
                               **{q: paired_effect(other, mine, m, q, direction, **kw) for q in ("signed_gap", "overall")}}
    board = {"version": LEADERBOARD_VERSION, "plan_name": plan.name, "plan_hash": identity["plan_hash"],
             "code": identity["code"], "plan": identity["plan"], "baseline": plan.baseline,
             "final_split": final_split(plan), "alpha": ev.alpha,
             "partial": bool(missing or corrupt),
             "runs": {"finished": len(ok), "missing": len(missing), "corrupt": len(corrupt),
                      "total": len(ok) + len(missing) + len(corrupt)},
             "corrupt": corrupt, "rows": rows}
    apply_family(board, plan)
    board["selection"] = selection_summary(board, plan)
    return board


def combine_leaderboards(boards: list[dict], plans: list[Plan], primary_methods: Optional[list] = None) -> dict:
    """One leaderboard from several results folders whose plans cover different tasks (e.g. one final plan per
    task, so a cheap task's final runs need not wait for an expensive task's selection), with ONE primary family
    over all of them: Holm over every task's comparisons, as if it had been one plan (docs/protocol.md §5).
    ``primary_methods``: the §7 fallback family (``verdict.restrict_family``), stated on the board."""
    from .verdict import apply_family, not_run_members, restrict_family

    if len(boards) == 1:
        if primary_methods is not None:
            restrict_family(boards[0], plans[0], primary_methods)
        return boards[0]
    first, p0 = boards[0], plans[0]
    for b, p in zip(boards[1:], plans[1:]):
        for what, x, y in (("baseline", p.baseline, p0.baseline), ("attribute", p.attribute, p0.attribute),
                           ("primary strength", p.primary.strength, p0.primary.strength),
                           ("primary methods", p.primary.methods, p0.primary.methods),
                           ("primary family tasks", p.primary.family_tasks, p0.primary.family_tasks),
                           ("alpha", b["alpha"], first["alpha"]), ("final split", b["final_split"], first["final_split"]),
                           ("evaluation settings", vars(p.evaluation), vars(p0.evaluation))):
            if x != y:
                raise FairllavaError(f"plans {p0.name} and {p.name}: different {what} ({y!r} vs {x!r}); their "
                                     "leaderboards cannot share one primary family")
    tasks = [t for p in plans for t in p.tasks]
    if len(set(tasks)) != len(tasks):
        raise FairllavaError(f"plans {', '.join(p.name for p in plans)}: a task is in more than one plan "
                             f"({', '.join(tasks)}); combine folders of different tasks only")
    rows = [dict(r) for b in boards for r in b["rows"]]
    for r in rows:
        r.pop("holm_p", None)
    # Only what is common: each source's own plan (methods, training) is in ``sources``.
    plan_dict = {"primary": copy.deepcopy(first["plan"]["primary"]),
                 "tasks": {t: v for b in boards for t, v in b["plan"]["tasks"].items()}}
    board = {**first, "plan_name": " + ".join(b["plan_name"] for b in boards),
             "plan_hash": " + ".join(b["plan_hash"] for b in boards), "plan": plan_dict, "rows": rows,
             "sources": [{"plan_name": b["plan_name"], "plan_hash": b["plan_hash"], "code": b["code"],
                          "plan": b["plan"], "runs": b["runs"],
                          "partial": bool(b["runs"]["missing"] or b["runs"]["corrupt"])} for b in boards],
             # a source is partial by its own runs or because its family lacked the other tasks, which are now in
             "partial": any(b["runs"]["missing"] or b["runs"]["corrupt"] for b in boards),
             "runs": {k: sum(b["runs"][k] for b in boards) for k in ("finished", "missing", "corrupt", "total")},
             "corrupt": [c for b in boards for c in b["corrupt"]],
             "selection": {t: v for b in boards for t, v in (b.get("selection") or {}).items()}}
    merged = copy.copy(p0)
    merged.__dict__.pop("_twins", None)  # runner.twin_of's cache belongs to p0's methods
    merged.methods = {k: v for p in plans for k, v in p.methods.items()}
    merged.tasks = {k: v for p in plans for k, v in p.tasks.items()}
    not_run = not_run_members(plans, merged.primary.methods or [m for m in merged.methods if m != merged.baseline])
    apply_family(board, merged, not_run)
    if primary_methods is not None:
        restrict_family(board, merged, primary_methods, not_run)
    return board


#: Selection rule (docs/protocol.md): eligible trials keep the pooled overall primary metric within this many
#: points of the baseline's; among them the pooled signed gap closest to 0 wins (ties: the lower trial index):
#: a trial that reverses the disparity is not fairer than one that removes it. A method with no eligible trial
#: still runs in the final plan, with its trial of the highest pooled overall (ties: the lower index), marked
#: ``eligible: false`` so the report says so.
SELECTION_MARGIN = 2.0


def selection_summary(board: dict, plan: Plan) -> dict:
    """Per task and method with trials: the chosen trial and its settings, by the pre-declared rule."""
    out: dict = {}
    for task in plan.tasks:
        # selection reads the validation split only (docs/protocol.md), even when a plan also evaluates test
        rows = [r for r in board["rows"] if r["task"] == task and r["strength"] == float(plan.primary.strength)
                and r.get("split", "val") == "val"]
        base = next((r for r in rows if r["method"] == plan.baseline), None)
        if base is None:
            continue
        m = plan.primary_metric(task)
        floor = base["metrics"][m]["overall"]["value"] - SELECTION_MARGIN
        for entry, spec in plan.methods.items():
            if not spec.trials:
                continue
            trials = [r for r in rows if r["entry"] == entry]
            want_seeds = sorted(plan.seeds(task, "val"))
            if len(trials) < len(spec.trials) or any(sorted(r["seeds"]) != want_seeds for r in trials + [base]):
                out.setdefault(task, {})[entry] = {"chosen": None, "reason": "not every trial has finished on every "
                                                   f"selection seed ({want_seeds})"}
                continue
            scored = [r for r in trials if r["metrics"][m]["overall"]["value"] is not None
                      and r["metrics"][m]["signed_gap"]["value"] is not None]
            ok = [r for r in scored if r["metrics"][m]["overall"]["value"] >= floor]
            if ok:
                pick = min(ok, key=lambda r: (abs(r["metrics"][m]["signed_gap"]["value"]), r["method"]))
                reason = (f"pooled signed {m} gap closest to 0 among {len(ok)} of {len(trials)} trials within "
                          f"{SELECTION_MARGIN:g} points of {plan.baseline}'s overall")
            else:  # the fallback (protocol §3): every declared method is reported, so take its least harmful trial
                pick = min(scored, key=lambda r: (-r["metrics"][m]["overall"]["value"], r["method"])) if scored else None
                reason = (f"no trial within {SELECTION_MARGIN:g} points of {plan.baseline}'s overall {m}"
                          + ("; fallback: the highest pooled overall" if pick else ""))
            out.setdefault(task, {})[entry] = {
                "chosen": pick["method"] if pick else None,
                "settings": plan.method_variants()[pick["method"]][1] if pick else None,
                "eligible": bool(ok), "reason": reason}
    return out


def _leakage(paths: list[Path]) -> Optional[dict]:
    """Within-label probe balanced accuracy (percent) at index 0 and at the regularised layer, mean over seeds."""
    audits = [json.loads(p.read_text(encoding="utf-8")) for p in paths if p.is_file()]
    if not audits:
        return None
    out = {"regularised_layer": audits[0]["regularised_layer"], "chance": audits[0]["chance"], "n_seeds": len(audits)}
    for name, layer_of in (("index0", lambda a: "0"), ("regularised", lambda a: str(a["regularised_layer"]))):
        vals = [a["per_layer"][layer_of(a)] for a in audits if layer_of(a) in a["per_layer"]]
        out[name] = {k: (sum(v[k] for v in vals) / len(vals) if vals and all(v[k] is not None for v in vals) else None)
                     for k in ("within_label", "marginal")}
    return out


def find_row(board: dict, task: str, strength: float, method: str, split: Optional[str] = None) -> Optional[dict]:
    split = split or board["final_split"]
    return next((r for r in board["rows"] if (r["task"], r["strength"], r["method"], r["split"]) ==
                 (task, float(strength), method, split)), None)
