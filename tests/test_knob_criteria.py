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


def test_answer_rates_read_the_baselines_predictions_per_group_and_label(tmp_path):
    """The table that tells "the baseline never gives the shortcut's answer" from "it gives it to everyone"."""
    import json

    card = {"labels": ["MEL", "NV", "VASC"],
            "shortcut": {"attribute": "race", "train_minority_label_probs": {"MEL": 0.85, "NV": 0.075, "VASC": 0.075},
                         "train_majority_label_probs": {"MEL": 1 / 3, "NV": 1 / 3, "VASC": 1 / 3}}}
    preds = {0: [("dark", "NV", "melanoma."), ("dark", "MEL", "melanoma."), ("light", "NV", "nevus."),
                 ("light", "MEL", "nevus.")],
             1: [("dark", "VASC", "nevus."), ("dark", "MEL", "melanoma."), ("light", "NV", "melanoma."),
                 ("light", "MEL", "melanoma.")]}
    for seed, rows in preds.items():
        d = tmp_path / "data" / "derm-vqa" / f"seed{seed}" / "S1" / "shortcut"
        d.mkdir(parents=True)
        (d / "datacard.json").write_text(json.dumps(card))
        g = tmp_path / "runs" / "derm-vqa" / "S1" / f"seed{seed}" / "lora" / "val" / "generate"
        g.mkdir(parents=True)
        (g / "predictions.jsonl").write_text("".join(
            json.dumps({"id": f"{seed}-{i}", "prediction": p, "label": y, "attributes": {"race": a}}) + "\n"
            for i, (a, y, p) in enumerate(rows)))
    board = _board([_row("lora", 1.0, [3.0, 20.0]), _row("fairllava", 1.0, [3.0, 20.0])])
    (r,) = knob_criteria.answer_rates(tmp_path, board)  # the other method's row is not read
    assert r["label"] == "MEL"
    assert r["rates"] == {"dark with": 100.0, "dark without": 50.0, "light with": 50.0, "light without": 50.0}
    assert "| dark without | dark with | light without | light with |" in knob_criteria.rates_markdown([r])
    assert "| derm-vqa | 1 | MEL | 50.0 | 100.0 | 50.0 | 50.0 |" in knob_criteria.rates_markdown([r])
