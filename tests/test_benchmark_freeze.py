"""The final plan must hold the selection's choices unchanged (fairllava.benchmark.freeze)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from fairllava.benchmark.freeze import check_frozen, frozen_check, frozen_markdown
from fairllava.benchmark.plan import load_plan, plan_from_dict
from fairllava.errors import FairllavaError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "benchmark"


def _selection():
    return load_plan(CONFIGS / "selection.yaml")


def _board(sel, chosen: dict) -> dict:
    """A selection leaderboard's `selection` section choosing trial ``chosen[entry]`` for derm-vqa."""
    v = sel.method_variants()
    return {"selection": {"derm-vqa": {e: {"chosen": f"{e}-t{k}", "settings": v[f"{e}-t{k}"][1]}
                                       for e, k in chosen.items()}}}


CHOSEN = {"lora-tuned": 1, "fairllava-selected": 2, "reweight": 0, "resample": 1, "adversarial": 2, "erasure": 0}


def _final(sel, chosen=CHOSEN) -> dict:
    """final-derm.yaml holding ``chosen``, written the way its header says (the placeholder settings removed)."""
    d = yaml.safe_load((CONFIGS / "final-derm.yaml").read_text())
    d["training"]["stage2"]["optim"]["lr"] = sel.training.stage2["optim"]["lr"]  # before the baseline rule
    for e, k in chosen.items():
        if e != "lora-tuned":
            d["methods"][e].pop("settings", None)
            d["methods"][e]["task_settings"] = {"derm-vqa": copy.deepcopy(sel.methods[e].trials[k])}
    return d


def _check(d, sel, chosen=CHOSEN):
    return frozen_check(plan_from_dict(d, "final.yaml"), [(sel, _board(sel, chosen))])


def _bad(rows):
    return {(r["method"], r["setting"], r["what"]) for r in rows if not r["ok"]}


def test_a_final_plan_holding_the_choices_passes_and_every_method_is_compared_whole():
    sel = _selection()
    rows = _check(_final(sel), sel)
    assert rows and all(r["ok"] for r in rows), frozen_markdown(rows, mismatches_only=True)
    whole = {r["method"]: int(r["setting"].split()[1]) for r in rows if r["setting"].startswith("all ")}
    assert set(whole) == {"lora", "fairllava-paper", "fairllava-selected", "reweight", "resample", "adversarial",
                          "erasure", "(shared)", "(stage 1)"}
    assert all(n > 50 for m, n in whole.items() if m != "(shared)")  # the whole TrainConfig, not the trial's keys
    assert whole["(shared)"] >= 10


def test_the_committed_final_plan_holds_the_committed_selections_choices():
    """configs/benchmark/final-derm.yaml against sweeps/selection as committed (protocol §3)."""
    folder = CONFIGS.parents[1] / "sweeps" / "selection"
    rows = check_frozen(load_plan(CONFIGS / "final-derm.yaml"), [folder])
    assert rows and all(r["ok"] for r in rows), frozen_markdown(rows, mismatches_only=True)
    assert {r["method"] for r in rows} >= {"lora", "fairllava-paper", "fairllava-selected", "reweight", "resample",
                                          "adversarial", "erasure"}


@pytest.mark.parametrize("edit, method, setting, what", [
    (lambda d: d["methods"]["fairllava-selected"]["task_settings"]["derm-vqa"]["fairness"].update(dac_lr=0.1),
     "fairllava-selected", "fairness.dac_lr", "chosen settings"),
    (lambda d: d["methods"]["adversarial"].pop("task_settings"), "adversarial", "adversarial.fairness_lambda",
     "chosen settings"),
    # the placeholder left beside the chosen trial: a key the trial does not set still changes the run
    (lambda d: d["methods"]["fairllava-selected"].update(settings={"fairness": {"mi_layer_index": 0}}),
     "fairllava-selected", "fairness.mi_layer_index", "chosen settings"),
    (lambda d: d["methods"]["adversarial"]["task_settings"]["derm-vqa"].update(optim={"max_steps": 500}),
     "adversarial", "optim.max_steps", "chosen settings"),
    (lambda d: d["methods"]["reweight"].update(method="resample"), "reweight", "method", "chosen settings"),
    (lambda d: d["methods"]["fairllava-paper"].update(settings={"fairness": {"dac_lr": 0.5}}), "fairllava-paper",
     "fairness.dac_lr", "settings (baseline rule applied)"),
    (lambda d: d["training"]["stage2"]["lora"].update(r=8), "lora", "lora.r", "chosen settings"),
    (lambda d: d["training"]["stage1"]["optim"].update(max_steps=60), "(stage 1)", "optim.max_steps",
     "stage-1 setting drifted"),
    (lambda d: d.update(model="tiny"), "(shared)", "model", "shared setting drifted"),
    (lambda d: d["tasks"]["derm-vqa"]["data"].update(n_train=600), "(shared)", "data.n_train",
     "shared setting drifted"),
    (lambda d: d["tasks"]["derm-vqa"]["generation"].update(max_new_tokens=16), "(shared)",
     "generation.max_new_tokens", "shared setting drifted"),
])
def test_a_changed_stale_or_missing_setting_is_a_mismatch(edit, method, setting, what):
    sel = _selection()
    d = _final(sel)
    edit(d)
    assert (method, setting, what) in _bad(_check(d, sel))


def test_equal_values_written_differently_and_result_free_keys_are_not_mismatches():
    sel = _selection()
    d = _final(sel)
    d["training"]["stage2"]["optim"]["lr"] = "2e-4"  # PyYAML reads this as a string; TrainConfig as 0.0002
    d["training"]["stage2"]["data"] = {"num_workers": 4}  # checkpoint.RESUME_FREE: does not change results
    d["training"]["stage2"]["logging"] = {"every_n_steps": 1}
    d["tasks"]["derm-vqa"]["data"]["n_val_per_cell"] = 50  # the evaluated split's size is not a setting
    assert not _bad(_check(d, sel))


def test_a_tuned_baseline_lr_becomes_every_methods_shared_lr_unless_the_method_chose_its_own():
    sel = _selection()
    chosen = {**CHOSEN, "lora-tuned": 0}  # lr 1e-4 instead of the shared 2e-4
    d = _final(sel, chosen)
    wrong = {m for m, s, _ in _bad(_check(d, sel, chosen)) if s == "optim.lr"}
    # reweight and resample chose their own lr; every other method must move to the baseline's
    assert wrong == {"lora", "fairllava-paper", "fairllava-selected", "adversarial", "erasure"}
    d["training"]["stage2"]["optim"]["lr"] = 1.0e-4
    assert not _bad(_check(d, sel, chosen))


def test_no_choice_a_missing_method_or_an_uncovered_task_fails():
    sel = _selection()
    board = _board(sel, CHOSEN)
    board["selection"]["derm-vqa"]["erasure"] = {"chosen": None, "reason": "not every trial has finished"}
    d = _final(sel)
    del d["methods"]["resample"]
    bad = {(r["method"], r["what"]) for r in frozen_check(plan_from_dict(d, "final.yaml"), [(sel, board)])
           if not r["ok"]}
    assert bad == {("erasure", "not every trial has finished"), ("resample", "method missing from the final plan")}
    board = {"selection": {"cxr-report": board["selection"]["derm-vqa"]}}
    rows = frozen_check(plan_from_dict(_final(sel), "final.yaml"), [(sel, board)])
    assert sorted(r["what"] for r in rows) == ["no selection folder covers this task of the final plan",
                                               "task of the selection missing from the final plan"]


def test_check_reads_a_results_folder_and_refuses_a_partial_selection_or_other_seeds(tmp_path):
    from typer.testing import CliRunner

    from fairllava.cli import app

    sel = _selection()
    folder = tmp_path / "selection"
    folder.mkdir()
    (folder / "benchmark.json").write_text(json.dumps({"plan": sel.to_dict()}))
    board = {**_board(sel, CHOSEN), "partial": False, "runs": {"finished": 38, "total": 38}, "plan_hash": sel.hash}
    (folder / "leaderboard.json").write_text(json.dumps(board))
    final = tmp_path / "final.yaml"
    final.write_text(yaml.safe_dump(_final(sel)))
    res = CliRunner().invoke(app, ["benchmark", "check", str(final), "--against", str(folder)])
    assert res.exit_code == 0 and "holds the settings chosen in" in res.output, res.output
    d = _final(sel)
    d["methods"]["erasure"]["task_settings"]["derm-vqa"]["erasure"]["mode"] = "global"
    final.write_text(yaml.safe_dump(d))
    res = CliRunner().invoke(app, ["benchmark", "check", str(final), "--against", str(folder)])
    assert isinstance(res.exception, FairllavaError) and "\n" not in str(res.exception)
    assert "derm-vqa erasure erasure.mode = 'global', selected 'conditional'" in str(res.exception)
    d = _final(sel)
    d["tasks"]["derm-vqa"]["seeds"] = {"selection": [0, 7], "test": [2, 3, 4, 5, 6]}
    with pytest.raises(FairllavaError, match=r"selected on seeds \[0, 1\] of derm-vqa, but the final plan declares"):
        check_frozen(plan_from_dict(d, "final.yaml"), [folder])
    (folder / "leaderboard.json").write_text(json.dumps({**board, "partial": True,
                                                         "runs": {"finished": 30, "total": 38}}))
    with pytest.raises(FairllavaError, match="partial \\(30 of 38 runs\\)"):
        check_frozen(plan_from_dict(_final(sel), "final.yaml"), [folder])
    (folder / "leaderboard.json").write_text(json.dumps({**board, "plan_hash": "0123"}))
    with pytest.raises(FairllavaError, match="leaderboard.json was made for plan 0123"):
        check_frozen(plan_from_dict(_final(sel), "final.yaml"), [folder])


def test_task_settings_are_per_task_and_never_with_trials():
    sel = _selection()
    d = _final(sel)
    d["methods"]["erasure"]["task_settings"]["mri"] = {}
    with pytest.raises(FairllavaError, match="methods.erasure.task_settings.mri: not a task of this plan"):
        plan_from_dict(d, "final.yaml")
    d = _final(sel)
    d["methods"]["erasure"]["trials"] = [{}]
    with pytest.raises(FairllavaError, match="methods.erasure: task_settings and trials together"):
        plan_from_dict(d, "final.yaml")


def test_a_final_method_the_selection_cannot_vouch_for_fails():
    sel = _selection()
    # the tuned baseline's entry kept in the final plan: its choice went to `lora`, so this one is unchecked
    d = _final(sel)
    d["methods"]["lora-tuned"] = {"method": "erasure"}
    assert ("lora-tuned", "trial", "tuned in the selection, but no chosen trial maps to this final method") in \
        _bad(_check(d, sel))
    # a leaderboard whose selection section lacks a tuned method
    board = _board(sel, CHOSEN)
    del board["selection"]["derm-vqa"]["adversarial"]
    rows = frozen_check(plan_from_dict(_final(sel), "final.yaml"), [(sel, board)])
    assert ("adversarial", "trial", "tuned in the selection, but no chosen trial maps to this final method") in _bad(rows)
    # a method absent from the selection is only allowed as the paper's estimator block, unchanged
    d = _final(sel)
    d["methods"]["fairllava-paper"] = {"method": "lora"}
    assert ("fairllava-paper", "method", "method with no selection budget") in _bad(_check(d, sel))
    d = _final(sel)
    d["methods"]["fairllava-paper"]["fairness_preset"] = "padchest"
    assert ("fairllava-paper", "method", "method with no selection budget") in _bad(_check(d, sel))
    d = _final(sel)
    d["methods"]["adversarial"]["trials"] = [{}]
    d["methods"]["adversarial"].pop("task_settings")
    with pytest.raises(FairllavaError, match="methods.adversarial.trials: a final plan runs one setting per method"):
        _check(d, sel)


def test_the_selection_rule_smallest_gap_among_trials_within_two_points_of_the_baseline():
    """docs/protocol.md section 3, computed by the leaderboard (fairllava.benchmark.leaderboard.selection_summary)."""
    from fairllava.benchmark.leaderboard import selection_summary

    sel = _selection()

    def row(method, entry, overall, gap, seeds=(0, 1)):
        m = {"overall": {"value": overall}, "signed_gap": {"value": gap}}
        return {"task": "derm-vqa", "strength": 1.0, "split": "val", "method": method, "entry": entry,
                "seeds": list(seeds), "metrics": {"accuracy": m}}

    rows = [row("lora", "lora", 60.0, 15.0)]
    picks = {  # entry: [(overall, gap) per trial], expected pick
        "lora-tuned": ([(61.0, 14.0), (60.0, 15.0), (58.5, 12.0)], "lora-tuned-t2"),
        "fairllava-selected": ([(59.0, 10.0), (57.0, 2.0), (58.5, 5.0)], "fairllava-selected-t2"),  # t1 levels down
        "reweight": ([(58.0, 9.0), (62.0, 9.0), (50.0, 0.0)], "reweight-t0"),  # tie on the gap: the lower index
        # none within 2 points: the fallback takes the highest overall, not the smallest gap
        "resample": ([(40.0, 1.0), (42.0, 3.0), (42.0, 2.0)], "resample-t1"),
        # closest to 0: a reversed disparity (-9) is not fairer than a smaller one (+4)
        "adversarial": ([(60.0, 15.0), (60.0, -9.0), (60.0, 4.0)], "adversarial-t2"),
    }
    for entry, (trials, _) in picks.items():
        rows += [row(f"{entry}-t{k}", entry, o, g) for k, (o, g) in enumerate(trials)]
    rows += [row(f"erasure-t{k}", "erasure", 60.0, 1.0, seeds=(0,) if k == 2 else (0, 1)) for k in range(3)]
    out = selection_summary({"rows": rows}, sel)["derm-vqa"]
    for entry, (_, want) in picks.items():
        assert out[entry]["chosen"] == want, (entry, out[entry])
    assert out["fairllava-selected"]["settings"] == sel.method_variants()["fairllava-selected-t2"][1]
    assert out["erasure"]["chosen"] is None and "every selection seed" in out["erasure"]["reason"]
    assert out["resample"]["eligible"] is False and "fallback" in out["resample"]["reason"]
    assert all(out[e]["eligible"] for e in ("lora-tuned", "fairllava-selected", "reweight", "adversarial"))
