"""The protocol's baseline-only knob criteria (docs/protocol.md §2), read from a knobs leaderboard.

With S = 1 the baseline's signed gap pooled over the selection seeds (validation split) must exclude 0; with
S = 0 it must include 0. Only the baseline's rows are read, so the knobs cannot favour any method.

With ``--runs DIR`` (the knobs results folder) it also tabulates how often the baseline gives the shortcut's
answer (derm: "melanoma"; cxr: a report with any pathology), per group and true label, read from the baseline's
own predictions. Why: a gap criterion that fails because the baseline never gives that answer at all (it has
not learned the task) calls for more training, not a stronger shortcut, and a gap alone cannot tell the two apart.

    python bench/knob_criteria.py sweeps/knobs/leaderboard.json [--runs sweeps/knobs] [--markdown FILE]
    # exit 1 when a criterion fails
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def criteria(board: dict) -> list[dict]:
    rows = [r for r in board["rows"] if r["method"] == board["baseline"]]
    out = []
    for r in sorted(rows, key=lambda r: (r["task"], -r["strength"])):
        gap = r["metrics"][r["primary_metric"]]["signed_gap"]
        ci = gap.get("ci")
        if ci is None:
            ok, want = False, "a CI (n_boot > 0)"
        elif r["strength"] > 0:
            ok, want = ci[0] > 0 or ci[1] < 0, "excludes 0"
        else:
            ok, want = ci[0] <= 0 <= ci[1], "includes 0"
        out.append({"task": r["task"], "strength": r["strength"], "split": r["split"], "seeds": r["seeds"],
                    "metric": r["primary_metric"], "gap": gap["value"], "ci": ci, "per_seed": gap.get("per_seed"),
                    "criterion": want, "pass": ok})
    return out


def answer_rates(out: Path, board: dict) -> list[dict]:
    """Per baseline row: percent of samples answered with the shortcut label, per (group, has that label), pooled
    over the row's seeds (plain shares; a descriptive check, not an endpoint)."""
    from fairllava.benchmark.runner import Step, data_dir
    from fairllava.benchmark.stats import predicted_labels, shortcut_target
    from fairllava.io import read_jsonl

    res = []
    for r in sorted((r for r in board["rows"] if r["method"] == board["baseline"]),
                    key=lambda r: (r["task"], -r["strength"])):
        counts: dict = {}
        target = None
        for seed in r["seeds"]:
            card = json.loads((data_dir(out, r["task"], seed, r["strength"]) / "datacard.json").read_text(
                encoding="utf-8"))
            target = shortcut_target(card, r["task"])
            attr = card["shortcut"]["attribute"]
            run = Step("run", r["task"], seed, r["strength"], r["method"], r["split"]).folder(out)
            rows = read_jsonl(run / "generate" / "predictions.jsonl")
            pred = predicted_labels([x["prediction"] for x in rows], card, r["task"])
            for x, p in zip(rows, pred):
                key = (x["attributes"][attr], x["label"] == target)
                n, k = counts.get(key, (0, 0))
                counts[key] = (n + 1, k + (p == target))
        res.append({"task": r["task"], "strength": r["strength"], "label": target,
                    "rates": {f"{g} {'with' if has else 'without'}": 100.0 * k / n
                              for (g, has), (n, k) in sorted(counts.items())}})
    return res


def rates_markdown(rates: list[dict]) -> str:
    cols = list(dict.fromkeys(c for r in rates for c in r["rates"]))
    lines = ["", "How often the baseline answers with the shortcut's label (percent of samples, seeds pooled; "
             "'with' = the true label is the shortcut's, so that column is its sensitivity and 'without' its "
             "false-positive rate):", ""]
    if not rates:
        return "\n".join(lines + ["(no baseline rows)"]) + "\n"
    lines += ["| task | S | label | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for r in rates:
        lines.append(f"| {r['task']} | {r['strength']:g} | {r['label']} | "
                     + " | ".join(f"{r['rates'][c]:.1f}" if c in r["rates"] else "–" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def markdown(res: list[dict], board: dict) -> str:
    lines = [f"Knob criteria ({board['plan_name']}, baseline `{board['baseline']}`, partial: {board['partial']}):", "",
             "| task | S | split | seeds | signed gap (primary metric) | 95 % CI | per seed | criterion | result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in res:
        ci = "–" if c["ci"] is None else f"[{c['ci'][0]:.1f}, {c['ci'][1]:.1f}]"
        per = ", ".join(f"{x:.1f}" for x in c["per_seed"] or [])
        lines.append(f"| {c['task']} | {c['strength']:g} | {c['split']} | {c['seeds']} | {c['gap']:.1f} "
                     f"({c['metric']}) | {ci} | {per} | {c['criterion']} | {'PASS' if c['pass'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("leaderboard", type=Path)
    ap.add_argument("--runs", type=Path, default=None, help="the results folder, for the answer-rate table")
    ap.add_argument("--markdown", type=Path, default=None)
    a = ap.parse_args()
    board = json.loads(a.leaderboard.read_text(encoding="utf-8"))
    res = criteria(board)
    md = markdown(res, board)
    if a.runs:
        md += rates_markdown(answer_rates(a.runs, board))
    print(md)
    if a.markdown:
        from fairllava.io import atomic_write_text

        atomic_write_text(a.markdown, md)
    return 0 if res and all(c["pass"] for c in res) and not board["partial"] else 1


if __name__ == "__main__":
    sys.exit(main())
