"""How far two sweeps of the same plan agree, run by run: the cross-machine variation the docs must state.

Why: a rerun on the same machine and thread count is bit-identical (tests), but a sweep that is rerun in
another session lands on another machine of the same kind, where kernels may round differently. This compares
two leaderboards of the same plan per (task, strength, method, seed): the primary metric overall and its signed
gap, and how many seeds of each row are bit-equal. Only cells that both leaderboards hold are compared.

    python bench/rerun_agreement.py docs/results/selection-attempt1/leaderboard.json \\
        sweeps/selection/leaderboard.json [--markdown FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _per_seed(cell: dict) -> dict[int, float]:
    return dict(zip(cell.get("seeds") or [], cell.get("per_seed") or []))


def agreement(a: dict, b: dict) -> list[dict]:
    """One row per (task, strength, method, seed) present in both: the two overall values and gaps."""
    if a.get("plan_hash") != b.get("plan_hash"):
        raise SystemExit(f"different plans ({a.get('plan_hash')} vs {b.get('plan_hash')}): nothing to compare")
    index = {(r["task"], r["strength"], r["method"]): r for r in b["rows"]}
    out = []
    for ra in a["rows"]:
        rb = index.get((ra["task"], ra["strength"], ra["method"]))
        if rb is None:
            continue
        m = ra["primary_metric"]
        oa, ob = (_per_seed(r["metrics"][m]["overall"]) for r in (ra, rb))
        ga, gb = (_per_seed(r["metrics"][m]["signed_gap"]) for r in (ra, rb))
        for seed in sorted(set(oa) & set(ob)):
            out.append({"task": ra["task"], "strength": ra["strength"], "method": ra["method"], "seed": seed,
                        "metric": m, "overall": (oa[seed], ob[seed]), "gap": (ga.get(seed), gb.get(seed))})
    return out


def markdown(rows: list[dict]) -> str:
    same = sum(r["overall"][0] == r["overall"][1] and r["gap"][0] == r["gap"][1] for r in rows)
    diffs = [abs(r["gap"][0] - r["gap"][1]) for r in rows if None not in r["gap"]]
    lines = [f"{len(rows)} runs in both; {same} identical in overall and gap; largest gap difference "
             f"{max(diffs, default=0):.1f} points.", "",
             "| task | S | method | seed | overall A | overall B | gap A | gap B |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['strength']:g} | {r['method']} | {r['seed']} | {r['overall'][0]:.1f} | "
                     f"{r['overall'][1]:.1f} | {r['gap'][0]:.1f} | {r['gap'][1]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    rows = agreement(*(json.loads(p.read_text(encoding="utf-8")) for p in (args.a, args.b)))
    text = markdown(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
