"""The protocol's baseline-only knob criteria (docs/protocol.md §2), read from a knobs leaderboard.

With S = 1 the baseline's signed gap pooled over the selection seeds (validation split) must exclude 0; with
S = 0 it must include 0. Only the baseline's rows are read, so the knobs cannot favour any method.

    python bench/knob_criteria.py runs/knobs/leaderboard.json [--markdown FILE]    # exit 1 when a criterion fails
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
    ap.add_argument("--markdown", type=Path, default=None)
    a = ap.parse_args()
    board = json.loads(a.leaderboard.read_text(encoding="utf-8"))
    res = criteria(board)
    md = markdown(res, board)
    print(md)
    if a.markdown:
        from fairllava.io import atomic_write_text

        atomic_write_text(a.markdown, md)
    return 0 if res and all(c["pass"] for c in res) and not board["partial"] else 1


if __name__ == "__main__":
    sys.exit(main())
