"""bench/rerun_agreement.py: per-run agreement of two leaderboards of one plan."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "rerun_agreement.py"
spec = importlib.util.spec_from_file_location("rerun_agreement", SCRIPT)
rerun_agreement = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rerun_agreement)


def _board(method_values: dict, plan_hash: str = "h") -> dict:
    rows = []
    for method, (seeds, overall, gap) in method_values.items():
        rows.append({"task": "derm-vqa", "strength": 1.0, "method": method, "primary_metric": "accuracy",
                     "metrics": {"accuracy": {"overall": {"seeds": seeds, "per_seed": overall},
                                              "signed_gap": {"seeds": seeds, "per_seed": gap}}}})
    return {"plan_hash": plan_hash, "rows": rows}


def test_only_runs_in_both_are_compared_and_differences_are_counted():
    a = _board({"lora": ([0, 1], [66.0, 64.0], [22.0, 9.0]), "erasure": ([0], [70.0], [8.0])})
    b = _board({"lora": ([0], [66.0], [20.0]), "adversarial": ([0], [60.0], [1.0])})
    rows = rerun_agreement.agreement(a, b)
    assert [(r["method"], r["seed"]) for r in rows] == [("lora", 0)]
    assert rows[0]["gap"] == (22.0, 20.0)
    text = rerun_agreement.markdown(rows)
    assert text.startswith("1 runs in both; 0 identical in overall and gap; largest gap difference 2.0 points.")
    same = rerun_agreement.agreement(a, a)
    assert rerun_agreement.markdown(same).startswith("3 runs in both; 3 identical")


def test_leaderboards_of_different_plans_are_refused():
    with pytest.raises(SystemExit, match="different plans"):
        rerun_agreement.agreement(_board({}, "a"), _board({}, "b"))
