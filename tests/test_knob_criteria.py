"""bench/knob_criteria.py: the protocol's baseline-only knob criteria read from a leaderboard."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "knob_criteria.py"
spec = importlib.util.spec_from_file_location("knob_criteria", SCRIPT)
knob_criteria = importlib.util.module_from_spec(spec)
spec.loader.exec_module(knob_criteria)


def _row(method, strength, ci, task="derm-vqa"):
    return {"task": task, "strength": strength, "split": "val", "method": method, "seeds": [0, 1],
            "primary_metric": "accuracy",
            "metrics": {"accuracy": {"signed_gap": {"value": sum(ci) / 2 if ci else 0.0, "ci": ci,
                                                    "per_seed": [1.0, 2.0]}}}}


def _board(rows, partial=False):
    return {"plan_name": "knobs", "baseline": "lora", "partial": partial, "rows": rows}


def test_s1_must_exclude_zero_and_s0_include_it_reading_only_the_baseline():
    ok = _board([_row("lora", 1.0, [3.0, 20.0]), _row("lora", 0.0, [-4.0, 5.0]),
                 _row("fairllava", 1.0, [-1.0, 1.0])])  # another method's row is never read
    res = knob_criteria.criteria(ok)
    assert [(c["strength"], c["pass"]) for c in res] == [(1.0, True), (0.0, True)]
    bad = _board([_row("lora", 1.0, [-1.0, 20.0]), _row("lora", 0.0, [0.5, 5.0])])
    assert [c["pass"] for c in knob_criteria.criteria(bad)] == [False, False]
    assert "| derm-vqa | 1 | val |" in knob_criteria.markdown(res, ok) and "FAIL" not in knob_criteria.markdown(res, ok)


def test_a_missing_ci_fails(tmp_path):
    res = knob_criteria.criteria(_board([_row("lora", 1.0, None)]))
    assert res[0]["pass"] is False and res[0]["criterion"].startswith("a CI")
