"""`fairllava benchmark` on the smoke plan: a full sweep, SIGKILL + resume, corrupt run folders, a leaderboard
that recomputes from the prediction files, and bad plans rejected before any run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fairllava.benchmark.leaderboard import build_leaderboard
from fairllava.benchmark.manifest import check_done, read_done, write_done
from fairllava.benchmark.plan import load_plan, plan_from_dict
from fairllava.benchmark.report import FILES
from fairllava.benchmark.runner import run_sweep
from fairllava.errors import FairllavaError

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "benchmark" / "smoke.yaml"


def _sweep(out: Path, plan=None):
    logs: list[str] = []
    res = run_sweep(plan or load_plan(SMOKE), out, threads=1, progress=False, log=logs.append)
    return res, logs


def _board(out: Path) -> dict:
    board = json.loads(json.dumps(build_leaderboard(out, log=lambda m: None)))
    board.pop("code")  # the code identity check has its own test (the tree may change while tests run)
    return board


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in (out / "runs").glob("*/*/*/*/*/DONE.json"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The smoke plan through the CLI (`fairllava benchmark run`, which also writes the leaderboard)."""
    from typer.testing import CliRunner

    from fairllava.cli import app

    out = tmp_path_factory.mktemp("bench") / "a"
    t0 = time.perf_counter()
    cli = CliRunner().invoke(app, ["benchmark", "run", str(SMOKE), "--out", str(out), "--threads-per-job", "1"])
    seconds = time.perf_counter() - t0
    assert cli.exit_code == 0, cli.output
    res, _ = _sweep(out)  # a second call finds everything finished
    return out, json.loads((out / "leaderboard.json").read_text()), res, seconds


def test_smoke_sweep_runs_every_step_and_writes_the_leaderboard(sweep):
    out, board, res, seconds = sweep
    assert len(res.done) == 14 and res.ran == [] and res.rerun_corrupt == []
    assert board == json.loads(json.dumps(build_leaderboard(out, log=lambda m: None)))
    assert {r["method"] for r in board["rows"]} == {"lora", "fairllava", "reweight"}
    assert all(r["seeds"] == [2, 3] and r["split"] == "test" for r in board["rows"])
    assert not board["partial"] and board["runs"] == {"finished": 6, "missing": 0, "corrupt": 0, "total": 6}
    assert board["family"]["size"] == 2 and all(r["verdict"]["adjusted"] for r in board["rows"] if r["method"] != "lora")
    assert board["plan_hash"] == load_plan(SMOKE).hash and board["code"]["code_hash"]
    for f in FILES:
        assert (out / f).is_file()
    assert "<img" in (out / "leaderboard.html").read_text() and (out / "leaderboard_derm-vqa.png").is_file()
    assert len((out / "leaderboard.csv").read_text().splitlines()) == 1 + 3 * 3  # methods x (2 metrics + signature)
    for run in _run_dirs(out):
        assert {p.name for p in run.iterdir()} == {"train", "generate", "evaluate", "audit", "DONE.json"}
        assert not (run / "train" / "checkpoints").exists()
        machine = read_done(run)["machine"]  # which CPU (or GPU) ran it: a sweep may span CPUs of one dtype
        assert machine["device"] in ("cpu", "cuda") and machine["name"]
    assert all(r["leakage"]["index0"]["within_label"] is not None for r in board["rows"])
    print(f"smoke sweep: {seconds:.1f} s")


def test_sigkill_mid_sweep_then_resume_keeps_finished_runs_and_equals_an_uninterrupted_sweep(sweep, tmp_path,
                                                                                           monkeypatch):
    import fairllava.benchmark.manifest as manifest

    board_a = {k: v for k, v in sweep[1].items() if k != "code"}
    out = tmp_path / "b"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", FAIRLLAVA_PROGRESS="off", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    log = open(tmp_path / "killed.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "fairllava", "benchmark", "run", str(SMOKE), "--out", str(out),
                             "--threads-per-job", "1", "--no-report"], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "runs").exists() and _run_dirs(out):
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    finished = _run_dirs(out)
    assert finished, f"no run finished before the kill: {(tmp_path / 'killed.log').read_text()[-2000:]}"
    assert len(finished) < 6, "the sweep ended before it was killed; nothing was resumed"
    snapshot = {p: (p.read_bytes(), p.stat().st_mtime_ns) for d in finished for p in d.rglob("*") if p.is_file()}
    # resume under the identity the killed process recorded (a concurrent edit of the tree would change ours)
    monkeypatch.setattr(manifest, "_CODE", json.loads((out / "benchmark.json").read_text())["code"])
    res, logs = _sweep(out)
    assert {str(d.relative_to(out)) for d in finished} <= set(res.done)
    for p, (data, mtime) in snapshot.items():
        assert p.read_bytes() == data and p.stat().st_mtime_ns == mtime, f"{p} was redone"
    assert _board(out) == board_a

    # a finished run whose files change afterwards is reported by path, left out, then re-run
    victim = finished[0]
    preds = victim / "generate" / "predictions.jsonl"
    preds.write_text(preds.read_text().replace('"prediction": "', '"prediction": "x', 1))
    seen: list[str] = []
    board = json.loads(json.dumps(build_leaderboard(out, log=seen.append)))
    assert board["partial"] and board["corrupt"][0]["path"] == str(victim)
    assert any(str(victim) in m for m in seen)
    row = next(r for r in board["rows"] if r["method"] == victim.parent.name)
    assert int(victim.parent.parent.name[4:]) not in row["seeds"]
    res, logs = _sweep(out)
    assert res.rerun_corrupt == [str(victim.relative_to(out))] and any(f"corrupt run folder {victim}" in m for m in logs)
    assert _board(out) == board_a


def test_parallel_workers_give_the_same_runs_as_one_process(sweep, tmp_path):
    """--jobs 2 (worker processes, one thread each) reproduces the in-process sweep's runs file for file."""
    d = yaml.safe_load(SMOKE.read_text())
    d["tasks"]["derm-vqa"]["seeds"]["test"] = [2]
    d["methods"] = {k: d["methods"][k] for k in ("lora", "fairllava")}
    plan = plan_from_dict(d, "smoke, seed 2, two methods")
    out = tmp_path / "par"
    res = run_sweep(plan, out, jobs=2, threads=1, progress=False, log=lambda m: None)
    assert len(res.ran) == 6  # base, data, stage 1, 2 runs... and nothing failed
    for method in ("lora", "fairllava"):
        rel = Path("runs/derm-vqa/S1/seed2") / method / "test" / "generate" / "predictions.jsonl"
        assert (out / rel).read_bytes() == (sweep[0] / rel).read_bytes(), rel


def test_a_step_that_runs_alone_gets_the_idle_cores():
    from fairllava.benchmark.runner import threads_for_launch

    assert threads_for_launch(1, cpus=2, jobs=2, can_run=1) == 2  # stage 1: nothing else can run yet
    assert threads_for_launch(1, cpus=2, jobs=2, can_run=5) == 1
    assert threads_for_launch(1, cpus=16, jobs=4, can_run=2) == 8
    assert threads_for_launch(3, cpus=2, jobs=2, can_run=1) == 3  # never below what was asked


def _fake_predictions(out: Path) -> None:
    """Replace every run's answers by seeded draws whose accuracy depends on method and group, and re-seal the
    runs: the leaderboard must follow the files, whatever they contain."""
    from fairllava.benchmark.derm import DERM_ANSWERS
    from fairllava.io import atomic_write_jsonl, read_jsonl

    p_right = {"lora": {"light": 0.8, "dark": 0.4}, "fairllava": {"light": 0.7, "dark": 0.65},
               "reweight": {"light": 0.75, "dark": 0.45}}
    for run in _run_dirs(out):
        method, seed = run.parent.name, int(run.parent.parent.name[4:])
        rng = np.random.default_rng([seed, len(method)])
        rows = read_jsonl(run / "generate" / "predictions.jsonl")
        for r in rows:
            right = rng.random() < p_right[method][r["attributes"]["race"]]
            wrong = "MEL" if r["label"] != "MEL" else "NV"
            r["prediction"] = DERM_ANSWERS[r["label"] if right else wrong]
        atomic_write_jsonl(run / "generate" / "predictions.jsonl", rows)
        info = {k: v for k, v in read_done(run).items() if k != "files"}
        write_done(run, info)


def test_leaderboard_numbers_recompute_from_the_prediction_files(sweep, tmp_path):
    from fairllava.benchmark.stats import shortcut_signature
    from fairllava.fairness import evaluate_predictions, holm

    out = tmp_path / "copy"
    shutil.copytree(sweep[0], out)
    _fake_predictions(out)
    board = _board(out)
    per = {}
    for row in board["rows"]:
        vals = []
        for seed in row["seeds"]:
            preds = out / "runs" / "derm-vqa" / "S1" / f"seed{seed}" / row["method"] / "test" / "generate" / "predictions.jsonl"
            card = json.loads((out / "data" / "derm-vqa" / f"seed{seed}" / "S1" / "shortcut" / "datacard.json").read_text())
            r = evaluate_predictions(preds, task="vqa", labels=card["labels"], attributes=["race"], metrics=["accuracy"],
                                     n_boot=0, n_min=1)
            g = r.groups["race"]
            sig = shortcut_signature(preds, card)["groups"]
            vals.append([r.overall["accuracy"], g["light"]["accuracy"], g["dark"]["accuracy"],
                         g["light"]["accuracy"] - g["dark"]["accuracy"], sig["dark"]["false_positive_pct"],
                         sig["light"]["false_positive_pct"]])
        mean = np.mean(vals, axis=0)
        per[row["method"]] = np.array(vals)
        m = row["metrics"]["accuracy"]
        assert [m["overall"]["value"], m["groups"]["light"]["value"], m["groups"]["dark"]["value"],
                m["signed_gap"]["value"]] == pytest.approx(mean[:4], abs=1e-9)
        s = row["metrics"]["signature_fpr"]["groups"]
        assert [s["dark"]["value"], s["light"]["value"]] == pytest.approx(mean[4:], abs=1e-9)
        assert m["signed_gap"]["ci"][0] <= m["signed_gap"]["value"] <= m["signed_gap"]["ci"][1]
    assert board["rows"][0]["metrics"]["accuracy"]["signed_gap"]["value"] > 10  # the planted gap is visible
    pvals = []
    for row in board["rows"][1:]:
        eff = row["vs_baseline"]["metrics"]["accuracy"]["signed_gap"]
        assert eff["value"] == pytest.approx(np.mean(per[row["method"]][:, 3] - per["lora"][:, 3]), abs=1e-9)
        assert row["verdict"]["reduction"] == pytest.approx(-eff["value"])
        pvals.append(eff["p_value"])
    assert [r["holm_p"] for r in board["rows"][1:]] == pytest.approx(holm(pvals))
    fair = next(r for r in board["rows"] if r["method"] == "fairllava")
    assert fair["verdict"]["reduction"] > 0  # the planted effect: fairllava closes most of the gap
    assert ("levelled down" in fair["verdict"]["text"]) == fair["verdict"]["levelled_down"]


# ---------------------------------------------------------------------------------------------- bad input


def _plan_dict() -> dict:
    return yaml.safe_load(SMOKE.read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["methods"].update(extra={"method": "dropout"}), "methods.extra.method: unknown method 'dropout'"),
    (lambda d: d["tasks"].update({"mri-vqa": {}}), "tasks.mri-vqa: unknown task"),
    (lambda d: d["tasks"]["derm-vqa"]["seeds"].update(test=[1, 2]), "seeds [1] are in both selection and test"),
    (lambda d: d["methods"]["reweight"].update(settings={"reweight": {"moed": "product"}}), "reweight.moed: unknown key"),
    (lambda d: d.update(splits=["train"]), "splits: expected a non-empty list"),
    (lambda d: d.update(baseline="erm"), "baseline: 'erm' must name a method"),
    (lambda d: d["tasks"]["derm-vqa"].update(stage2={"optim": {"max_stpes": 3}}), "max_stpes: unknown key"),
    (lambda d: d["training"]["stage2"].update(fairness={"dac_lr": 0.1}), "training.stage2.fairness: estimator"),
])
def test_bad_plan_is_a_one_line_error_before_any_run(tmp_path, edit, message):
    from typer.testing import CliRunner

    from fairllava.cli import app

    d = _plan_dict()
    edit(d)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(d))
    res = CliRunner().invoke(app, ["benchmark", "run", str(path), "--out", str(tmp_path / "out")])
    assert isinstance(res.exception, FairllavaError), res.output
    assert message in str(res.exception) and "\n" not in str(res.exception) and str(path) in str(res.exception)
    assert not (tmp_path / "out").exists()


def test_results_folder_of_another_plan_or_code_version_is_refused(sweep, monkeypatch):
    out = sweep[0]
    d = _plan_dict()
    d["evaluation"]["n_boot"] = 100
    before = sorted(p for p in out.rglob("*"))
    with pytest.raises(FairllavaError, match="made by a different plan"):
        run_sweep(plan_from_dict(d, "other.yaml"), out, threads=1, log=lambda m: None)
    import fairllava.benchmark.manifest as manifest

    monkeypatch.setattr(manifest, "_CODE", {**manifest.code_version(), "code_hash": "0" * 16, "commit": "f" * 40})
    with pytest.raises(FairllavaError, match="made by another code version .* use a new --out or check out that commit"):
        run_sweep(load_plan(SMOKE), out, threads=1, log=lambda m: None)
    assert sorted(p for p in out.rglob("*")) == before
    monkeypatch.undo()
    import fairllava.benchmark.plan as plan_mod

    here = plan_mod.compute_identity()
    assert json.loads((out / "benchmark.json").read_text())["compute"] == here
    other = {"device": here["device"], "dtype": "float32" if here["dtype"] != "float32" else "bfloat16"}
    monkeypatch.setattr(plan_mod, "compute_identity", lambda: other)
    with pytest.raises(FairllavaError, match=f"its runs ran on {here['device']} in {here['dtype']}; this machine"):
        run_sweep(load_plan(SMOKE), out, threads=1, log=lambda m: None)
    assert sorted(p for p in out.rglob("*")) == before
    monkeypatch.undo()
    with pytest.raises(FairllavaError, match="trial_budget is 2"):
        d = _plan_dict()
        d["trial_budget"] = 2
        d["methods"]["fairllava"]["trials"] = [{}, {"fairness": {"fairness_lambda": 0.5}}]
        plan_from_dict(d, "selection.yaml")


def test_a_tasks_stage2_overrides_reach_its_stage2_runs_only():
    """A task whose baseline needs a longer training (protocol section 2) changes neither its shared stage-1
    projector nor another task's runs; a method's settings and trials still win over it."""
    from fairllava.benchmark.configs import stage1_config, stage2_config

    d = _plan_dict()
    d["tasks"]["cxr-report"] = {**d["tasks"]["derm-vqa"], "generation": {"max_new_tokens": 4}}
    d["tasks"]["cxr-report"]["stage2"] = {"optim": {"max_steps": 7}}
    d["methods"]["reweight"]["settings"] = {"optim": {"max_steps": 5}}
    plan = plan_from_dict(d, "p.yaml")
    steps = {(t, v): stage2_config(plan, t, 2, v, "B", "D", "R", "P")["optim"]["max_steps"]
             for t in ("derm-vqa", "cxr-report") for v in ("lora", "reweight")}
    assert steps == {("derm-vqa", "lora"): 3, ("derm-vqa", "reweight"): 5, ("cxr-report", "lora"): 7,
                     ("cxr-report", "reweight"): 5}
    assert {stage1_config(plan, t, 2, "B", "D", "R")["optim"]["max_steps"] for t in plan.tasks} == {2}


def test_leaderboards_of_plans_for_different_tasks_combine_under_one_primary_family(sweep, tmp_path):
    """One final plan per task (a cheap task need not wait for an expensive one): the combined leaderboard holds
    both tasks and Holm runs over every task's comparisons together, as one plan would."""
    from fairllava.benchmark.leaderboard import combine_leaderboards
    from fairllava.benchmark.report import provenance
    from fairllava.benchmark.stats import holm

    board = json.loads(json.dumps(sweep[1]))
    plan = load_plan(SMOKE)
    d = _plan_dict()
    d["tasks"] = {"cxr-report": d["tasks"]["derm-vqa"]}
    other_plan = plan_from_dict(d, "other.yaml")
    other = json.loads(json.dumps(board))
    other["plan_name"], other["plan_hash"] = "other", "0123"
    other["plan"]["tasks"] = {"cxr-report": other["plan"]["tasks"].pop("derm-vqa")}
    for r in other["rows"]:
        r["task"] = "cxr-report"
    # distinct p-values, so the joint ranking matters
    for rows, ps in ((board["rows"], [0.01, 0.04]), (other["rows"], [0.02, 0.03])):
        for r, p in zip([r for r in rows if r.get("vs_baseline")], ps):
            r["vs_baseline"]["metrics"][r["primary_metric"]]["signed_gap"]["p_value"] = p
    before = json.loads(json.dumps([board, other]))
    both = combine_leaderboards([board, other], [plan, other_plan])
    fam = [r for r in both["rows"] if "holm_p" in r]
    assert both["family"]["size"] == len(fam) == 2 * board["family"]["size"] > 0
    raw = [r["vs_baseline"]["metrics"][r["primary_metric"]]["signed_gap"]["p_value"] for r in fam]
    assert [r["holm_p"] for r in fam] == pytest.approx(holm(raw))
    assert {r["task"] for r in both["rows"]} == {"derm-vqa", "cxr-report"}
    assert all(r["holm_p"] >= p for r, p in zip(fam, raw))
    assert [s["plan_name"] for s in both["sources"]] == ["smoke", "other"] and "plan `other` (hash 0123)" in provenance(both)
    assert json.loads(json.dumps([board, other])) == before  # the inputs are left as they were
    with pytest.raises(FairllavaError, match="a task is in more than one plan"):
        combine_leaderboards([board, board], [plan, plan])
    d["baseline"] = "reweight"
    d["methods"]["reweight"].pop("settings", None)
    with pytest.raises(FairllavaError, match="different baseline"):
        combine_leaderboards([board, other], [plan, plan_from_dict(d, "other.yaml")])
    d = _plan_dict()
    d["tasks"] = {"cxr-report": d["tasks"]["derm-vqa"]}
    d["evaluation"]["n_perm"] = d["evaluation"].get("n_perm", 0) + 7  # other statistics: not one family
    with pytest.raises(FairllavaError, match="different evaluation settings"):
        combine_leaderboards([board, other], [plan, plan_from_dict(d, "other.yaml")])


def test_a_family_split_over_plans_is_partial_and_provisional_until_every_task_is_in(sweep):
    from fairllava.benchmark.leaderboard import combine_leaderboards
    from fairllava.benchmark.verdict import apply_family

    d = _plan_dict()
    d["primary"]["family_tasks"] = ["derm-vqa", "cxr-report"]
    derm = plan_from_dict(d, "final-derm.yaml")
    alone = json.loads(json.dumps(sweep[1]))
    assert alone["partial"] is False
    apply_family(alone, derm)
    members = [r for r in alone["rows"] if "holm_p" in r]
    assert alone["partial"] is True and alone["family"]["missing_tasks"] == ["cxr-report"]
    assert members and all(r["verdict"]["provisional"] and r["verdict"]["text"].startswith("PROVISIONAL")
                           for r in members)
    d["tasks"] = {"cxr-report": d["tasks"]["derm-vqa"]}
    cxr = plan_from_dict(d, "final-cxr.yaml")
    other = json.loads(json.dumps(alone))
    other["plan"]["tasks"] = {"cxr-report": other["plan"]["tasks"].pop("derm-vqa")}
    for r in other["rows"]:
        r["task"] = "cxr-report"
    both = combine_leaderboards([alone, other], [derm, cxr])
    assert both["partial"] is False and both["family"]["missing_tasks"] == []
    assert not any(r["verdict"]["provisional"] for r in both["rows"] if r.get("verdict"))
    with pytest.raises(FairllavaError, match="primary.family_tasks"):
        d["primary"]["family_tasks"] = ["derm-vqa"]  # must include the plan's own task
        plan_from_dict(d, "final-cxr.yaml")


def test_a_method_one_task_leaves_out_by_design_counts_as_p_1_and_is_not_provisional(sweep):
    """protocol §8: cxr-report runs fewer methods than derm-vqa; the family keeps its declared size (the left-out
    comparison enters Holm as p = 1, so no adjusted p gets smaller), the board names it, verdicts are final."""
    from fairllava.benchmark.leaderboard import combine_leaderboards
    from fairllava.benchmark.power import family_size_of
    from fairllava.benchmark.stats import holm
    from fairllava.benchmark.verdict import apply_family

    d = _plan_dict()
    d["primary"]["family_tasks"] = ["derm-vqa", "cxr-report"]
    derm = plan_from_dict(d, "final-derm.yaml")
    alone = json.loads(json.dumps(sweep[1]))
    apply_family(alone, derm)
    d["tasks"] = {"cxr-report": d["tasks"]["derm-vqa"]}
    del d["methods"]["reweight"]
    cxr = plan_from_dict(d, "final-cxr.yaml")
    other = json.loads(json.dumps(alone))
    other["plan"]["tasks"] = {"cxr-report": other["plan"]["tasks"].pop("derm-vqa")}
    other["rows"] = [dict(r, task="cxr-report") for r in other["rows"] if r["entry"] != "reweight"]
    rows = [r for b in (alone, other) for r in b["rows"] if "holm_p" in r]  # the family members
    for r, p in zip(rows, (0.004, 0.03, 0.01)):  # the smoke sweep is too small for p-values: give them some
        r["vs_baseline"] = json.loads(json.dumps(r["vs_baseline"]))
        r["vs_baseline"]["metrics"][r["primary_metric"]]["signed_gap"]["p_value"] = p
    both = combine_leaderboards([alone, other], [derm, cxr])
    fam = both["family"]
    members = [r for r in both["rows"] if "holm_p" in r]
    assert fam["size"] == 4 == family_size_of([derm, cxr]) and len(members) == 3
    assert fam["not_run"] == ["cxr-report/reweight"] and both["partial"] is False
    assert not any(r["verdict"]["provisional"] for r in both["rows"] if r.get("verdict"))
    raw = [r["vs_baseline"]["metrics"][r["primary_metric"]]["signed_gap"]["p_value"] for r in members]
    assert sorted(raw) == [0.004, 0.01, 0.03]
    assert [r["holm_p"] for r in members] == holm(raw + [1.0])[:3]  # m = 4, not 3
    assert holm(raw + [1.0])[:3] != holm(raw)
    from fairllava.benchmark.report import provenance  # the board says so
    assert "not run by design, counted as p = 1: cxr-report/reweight" in provenance(both)


def test_a_missing_comparison_never_makes_holm_milder_and_labels_keep_their_qualifiers(sweep):
    from fairllava.benchmark.report import cell_table
    from fairllava.benchmark.verdict import apply_family, verdict_label

    plan = plan_from_dict(_plan_dict(), "plan.yaml")
    pv = lambda r: r["vs_baseline"]["metrics"][r["primary_metric"]]["signed_gap"]["p_value"]  # noqa: E731

    def fresh():  # the smoke board with chosen p-values, plus an S = 0 copy of a member (outside the family)
        board = json.loads(json.dumps(sweep[1]))
        for r in board["rows"]:
            r.pop("holm_p", None)
        members = [r for r in board["rows"] if in_family_row(board, r)]
        for k, r in enumerate(members):
            r["vs_baseline"]["metrics"][r["primary_metric"]]["signed_gap"]["p_value"] = 0.01 * (k + 1)
        s0 = json.loads(json.dumps(members[0]))
        s0["strength"] = 0.0
        board["rows"].append(s0)
        return board, members

    def in_family_row(board, r):
        from fairllava.benchmark.verdict import in_family
        return in_family(board, plan, r)

    board, members = fresh()
    size = len(members)
    assert size >= 2
    # a member's runs not in yet: the others are still corrected for the declared family, and provisional
    board["rows"] = [r for r in board["rows"] if r is not members[0]]
    apply_family(board, plan)
    assert board["family"]["size"] == size
    for r in members[1:]:
        assert r["verdict"]["provisional"] and verdict_label(r["verdict"]).endswith("(provisional)")
    first = min(members[1:], key=pv)  # Holm's first step multiplies by the declared size
    assert first["holm_p"] == pytest.approx(min(1.0, pv(first) * size), rel=1e-12)
    table = cell_table(board, first["task"], first["strength"], first["split"])
    assert any("(provisional)" in str(c) for row in table.rows for c in row)
    # a member without a p counts as p = 1 in the correction and gets no adjusted p itself
    board, members = fresh()
    members[0]["vs_baseline"]["metrics"][members[0]["primary_metric"]]["signed_gap"]["p_value"] = None
    apply_family(board, plan)
    assert board["family"]["size"] == size and members[0]["holm_p"] is None
    first = min(members[1:], key=pv)
    assert first["holm_p"] == pytest.approx(min(1.0, pv(first) * size), rel=1e-12)
    outside = [r for r in board["rows"] if r.get("verdict") and not r["verdict"]["adjusted"]]
    assert outside  # the S = 0 rows
    assert all("outside the primary family" in verdict_label(r["verdict"]) for r in outside)


def test_report_writes_the_readme_block_from_the_leaderboard(sweep, tmp_path):
    from typer.testing import CliRunner

    from fairllava.benchmark.report import README_BEGIN, README_END
    from fairllava.cli import app

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_BEGIN}\nold numbers\n{README_END}\n\nafter\n")
    board_dir = tmp_path / "docs" / "results" / "final"
    res = CliRunner().invoke(app, ["benchmark", "report", str(sweep[0]), "--to", str(board_dir),
                                   "--update-readme", str(readme)])
    assert res.exit_code == 0, res.output
    text = readme.read_text()
    block = text.split(README_BEGIN)[1].split(README_END)[0]
    assert "old numbers" not in block and text.endswith(f"{README_END}\n\nafter\n")
    board = json.loads((board_dir / "leaderboard.json").read_text())
    verdicts = [r["verdict"]["text"] for r in board["rows"] if r.get("verdict") and r["verdict"]["adjusted"]]
    assert verdicts and all(v in block for v in verdicts)
    assert "](docs/results/final/leaderboard_derm-vqa.png)" in block and (board_dir / "leaderboard_derm-vqa.png").is_file()
    assert "| lora |" in block and "power" in block
    partial = json.loads(json.dumps(board))
    partial["runs"] = {**partial["runs"], "missing": 1, "finished": partial["runs"]["finished"] - 1}
    from fairllava.benchmark.report import readme_block
    status = readme_block(partial, board_dir, readme)
    assert "Partial" in status and "| lora |" not in status and "No numbers here" in status
    readme.write_text("# no markers\n")
    res = CliRunner().invoke(app, ["benchmark", "report", str(sweep[0]), "--to", str(tmp_path / "b2"),
                                   "--update-readme", str(readme)])
    assert isinstance(res.exception, FairllavaError) and "missing the <!-- benchmark-results:begin -->" in str(
        res.exception) and not (tmp_path / "b2").exists()


def test_the_fallback_family_is_applied_at_report_time_and_stated(sweep):
    """Protocol §7: if power calls for the m = 2 family, the final plans stay as run; the report restricts it."""
    from fairllava.benchmark.leaderboard import combine_leaderboards
    from fairllava.benchmark.report import provenance

    plan = plan_from_dict(_plan_dict(), "plan.yaml")
    full = json.loads(json.dumps(sweep[1]))
    pv = lambda r: r["vs_baseline"]["metrics"][r["primary_metric"]]["signed_gap"]["p_value"]  # noqa: E731
    board = combine_leaderboards([json.loads(json.dumps(full))], [plan], primary_methods=["fairllava"])
    members = [r for r in board["rows"] if "holm_p" in r]
    assert {r["method"] for r in members} == {"fairllava"} and board["family"]["size"] == 1 < full["family"]["size"]
    assert all(r["holm_p"] == pv(r) for r in members if pv(r) is not None)  # m = 1: unadjusted
    assert not next(r for r in board["rows"] if r["method"] == "reweight")["verdict"]["adjusted"]
    assert "restricted at report time to fairllava vs lora" in provenance(board)
    with pytest.raises(FairllavaError, match="--primary-methods: 'lora' is not a non-baseline method"):
        combine_leaderboards([json.loads(json.dumps(full))], [plan], primary_methods=["lora"])
    with pytest.raises(FairllavaError, match="--primary-methods: '\\(none\\)'"):
        combine_leaderboards([json.loads(json.dumps(full))], [plan], primary_methods=[])


def test_a_method_can_run_at_some_strengths_only():
    """The S = 0 control for the baseline alone (protocol section 8): the other methods' S = 0 runs are not planned,
    and no run is copied from a twin that does not run at its strength."""
    from fairllava.benchmark.runner import plan_steps, twin_of

    d = _plan_dict()
    d["tasks"]["derm-vqa"]["strengths"] = [1.0, 0.0]
    d["methods"] = {"early": {"method": "lora", "strengths": [1]}, "lora": {"method": "lora"},
                    "fairllava": {"method": "fairllava", "strengths": [1.0]}}
    plan = plan_from_dict(d, "p.yaml")
    runs = {(s.variant, s.strength, s.seed) for s in plan_steps(plan) if s.kind == "run"}
    assert runs == {(v, s, k) for k in (2, 3) for v, s in
                    (("early", 1.0), ("lora", 1.0), ("lora", 0.0), ("fairllava", 1.0))}
    steps = {(s.variant, s.strength): s for s in plan_steps(plan) if s.kind == "run" and s.seed == 2}
    assert twin_of(plan, steps["lora", 1.0]) == steps["early", 1.0]  # same settings, same strength
    assert twin_of(plan, steps["lora", 0.0]) is None  # "early" has no S = 0 run to copy from
    assert plan.hash != plan_from_dict({**d, "methods": {**d["methods"], "fairllava": {"method": "fairllava"}}},
                                       "p.yaml").hash
    for edit, message in [
        (lambda m: m["fairllava"].update(strengths=[0.5]), "methods.fairllava.strengths: 0.5 is not a strength"),
        (lambda m: m["lora"].update(strengths=[1.0]), "methods.lora.strengths: the baseline runs at every strength"),
        (lambda m: m["fairllava"].update(strengths=[0.0]), "a primary method runs at the primary strength 1.0"),
        (lambda m: m["fairllava"].update(strengths=[]), "methods.fairllava.strengths: expected a non-empty list"),
    ]:
        bad = {**d, "methods": {k: dict(v) for k, v in d["methods"].items()}}
        edit(bad["methods"])
        with pytest.raises(FairllavaError, match=message):
            plan_from_dict(bad, "p.yaml")


def test_schema_keys_at_their_default_leave_the_plan_hash_unchanged():
    d = _plan_dict()
    h = plan_from_dict(d, "p.yaml").hash
    d["tasks"]["derm-vqa"]["stage2"] = {}
    d["methods"]["lora"]["task_settings"] = {}
    d["primary"]["family_tasks"] = None
    d["methods"]["lora"]["strengths"] = None
    assert plan_from_dict(d, "p.yaml").hash == h
    d["tasks"]["derm-vqa"]["stage2"] = {"optim": {"max_steps": 4}}
    assert plan_from_dict(d, "p.yaml").hash != h


def test_head_to_head_compares_a_method_with_every_other_on_the_same_samples(sweep):
    out, board = sweep[0], sweep[1]
    h2h = build_leaderboard(out, log=lambda m: None, head_to_head="fairllava")
    rows = {r["method"]: r for r in h2h["rows"]}
    assert "vs_focus" not in rows["lora"] and "vs_focus" not in rows["fairllava"]
    eff = rows["reweight"]["vs_focus"]
    m = rows["reweight"]["primary_metric"]
    per = lambda r: r["metrics"][m]["signed_gap"]["per_seed"]  # noqa: E731
    want = np.mean(np.array(per(rows["fairllava"])) - np.array(per(rows["reweight"])))
    assert eff["focus"] == "fairllava" and eff["signed_gap"]["value"] == pytest.approx(want, abs=1e-9)
    assert eff["signed_gap"]["p_value"] is None or 0 <= eff["signed_gap"]["p_value"] <= 1
    # the primary family and verdicts do not change: head to head is secondary
    assert [r.get("holm_p") for r in h2h["rows"]] == [r.get("holm_p") for r in board["rows"]]
    from fairllava.benchmark.report import write_leaderboard

    write_leaderboard(h2h, out / "h2h")
    assert "| fairllava vs |" in (out / "h2h" / "leaderboard.md").read_text()
    with pytest.raises(FairllavaError, match="--head-to-head nope: not a method of plan smoke"):
        build_leaderboard(out, log=lambda m: None, head_to_head="nope")


def test_a_run_with_an_earlier_runs_exact_settings_is_copied_not_retrained(tmp_path):
    """Equal trial budgets make the tuned baseline repeat the shared settings: that run is the baseline's own."""
    d = _plan_dict()
    d["tasks"]["derm-vqa"]["seeds"]["test"] = [2]
    shared_lr = d["training"]["stage2"]["optim"]["lr"]
    d["methods"] = {"lora": {"method": "lora"},
                    "lora-tuned": {"method": "lora", "trials": [{"optim": {"lr": shared_lr}}, {"optim": {"lr": 3e-3}}]}}
    d["audit"] = {"enabled": False}
    plan = plan_from_dict(d, "twins.yaml")
    from fairllava.benchmark.runner import dependencies, plan_steps, twin_of

    steps = {s.variant: s for s in plan_steps(plan) if s.kind == "run"}
    assert twin_of(plan, steps["lora-tuned-t0"]) == steps["lora"] and twin_of(plan, steps["lora-tuned-t1"]) is None
    assert steps["lora"] in dependencies(plan, steps["lora-tuned-t0"])
    out = tmp_path / "out"
    _sweep(out, plan)
    a, b, c = (steps[v].folder(out) for v in ("lora", "lora-tuned-t0", "lora-tuned-t1"))
    assert read_done(b)["twin_of"] == steps["lora"].id and "twin_of" not in read_done(c)
    for f in ("train/adapter_model.safetensors", "generate/predictions.jsonl"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    assert (a / "train/adapter_model.safetensors").read_bytes() != (c / "train/adapter_model.safetensors").read_bytes()
    assert (b / "evaluate" / "metrics.json").is_file() and check_done(b)[0] == "ok"
    # the source changed after the copy (a corrupt source is re-run): the copy is redone from the new source
    with open(a / "generate" / "predictions.jsonl", "a") as f:
        f.write("\n")
    _, logs = _sweep(out, plan)
    assert any(str(a) in m and "re-running" in m for m in logs)
    assert any(str(b) in m and "its twin" in m for m in logs), logs
    assert read_done(b)["twin_of"] == steps["lora"].id and check_done(b)[0] == "ok"
    assert (a / "generate/predictions.jsonl").read_bytes() == (b / "generate/predictions.jsonl").read_bytes()


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main", *args],
                   cwd=cwd, check=True, capture_output=True)


def test_the_projects_gitignore_keeps_a_sweeps_runs():
    """The root .gitignore once said `runs/`, which hid every sweeps/*/runs/ from git: committed sweeps were empty."""
    repo = SMOKE.parents[2]
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    res = subprocess.run(["git", "-C", str(repo), "check-ignore", "sweeps/x/runs/t/S1/seed0/m/test/DONE.json",
                          "sweeps/x/stage1/t/seed0/train/projector.safetensors"], capture_output=True)
    assert res.returncode == 1, res.stdout  # 1: neither path is ignored


def _clone_of(src: Path, tmp_path: Path) -> Path:
    _git(src, "init", "-q")
    _git(src, "add", "-A")
    _git(src, "commit", "-q", "-m", "sweep")
    _git(tmp_path, "clone", "-q", str(src), "clone")
    return tmp_path / "clone"


def test_a_committed_sweep_resumes_from_a_fresh_clone_without_its_bulky_files(sweep, tmp_path, monkeypatch):
    """Sweeps span sessions on fresh machines, so the folder is committed as it grows: git leaves out the weights,
    images and base model (its .gitignore); the clone keeps every finished run, rebuilds what a remaining run needs
    bit for bit, and ends with the same leaderboard."""
    import fairllava.benchmark.manifest as manifest

    src, board_a = tmp_path / "repo", {k: v for k, v in sweep[1].items() if k != "code"}
    shutil.copytree(sweep[0], src)
    (src / "data" / "derm-vqa" / "seed2" / "S1" / ".shortcut.x1.tmp").mkdir()  # an interrupted write's leftover
    (src / "data" / "derm-vqa" / "seed2" / "S1" / ".shortcut.x1.tmp" / "a.png").write_bytes(b"png")
    answered, unaudited = (src / "runs" / "derm-vqa" / "S1" / f"seed{k}" / "fairllava" / "test" for k in (2, 3))
    for run in (answered, unaudited):  # killed after training (and answering), before the DONE.json
        (run / "DONE.json").unlink()
        shutil.rmtree(run / "evaluate")
    shutil.rmtree(unaudited / "audit")
    assert list(src.glob("runs/*/*/*/*/*/audit/features/*.npz"))
    out = _clone_of(src, tmp_path)
    assert all("stage1" in p.parts for p in out.rglob("*.safetensors")) and not list(out.rglob("*.tmp"))
    assert not list(out.glob("data/*/*/*/shortcut/images")) and not list(out.glob("base/*/*/model"))
    assert not list(out.glob("runs/*/*/*/*/*/audit/features"))  # the audit's cache: its audit.json is committed
    monkeypatch.setattr(manifest, "_CODE", json.loads((out / "benchmark.json").read_text())["code"])
    assert _board(out)["runs"]["finished"] == 4  # a finished run without its weights is still finished
    res, logs = _sweep(out)
    assert res.ran == [str(r.relative_to(src)) for r in (answered, unaudited)]
    # the runs need both seeds' base models and S1 data; S0's data is pruned too, but only stage 1 read it
    assert sum("rebuilding" in m for m in logs) == 4, logs
    for d in ("data/derm-vqa/seed2/S1", "base/derm-vqa/seed3"):  # rebuilt, proven equal, original record kept
        assert (out / d / "DONE.json").read_bytes() == (sweep[0] / d / "DONE.json").read_bytes()
    assert not list((out / answered.relative_to(src) / "train").glob("*.safetensors"))  # answered: evaluated only
    assert list((out / unaudited.relative_to(src) / "train").glob("*.safetensors"))  # its audit needed the model
    assert _board(out) == board_a


def test_a_rebuilt_or_damaged_input_of_finished_runs_must_reproduce_its_record(sweep, tmp_path, monkeypatch):
    """Never a silent mix of inputs: a rebuilt input that differs is an error that leaves the folder as it was; a
    damaged one is repaired only if it rebuilds to its recorded files; a damaged stage 1 is an error."""
    import fairllava.benchmark.manifest as manifest

    src = tmp_path / "repo"
    shutil.copytree(sweep[0], src)
    victim = src / "runs" / "derm-vqa" / "S1" / "seed2" / "lora" / "test"
    shutil.rmtree(victim)
    out = _clone_of(src, tmp_path)
    monkeypatch.setattr(manifest, "_CODE", json.loads((out / "benchmark.json").read_text())["code"])
    data = out / "data" / "derm-vqa" / "seed2" / "S1"
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    marker = json.loads((data / "DONE.json").read_text())
    rel = next(r for r in marker["files"] if r.startswith("shortcut/images/"))
    marker["files"][rel] = "0" * 64
    (data / "DONE.json").write_text(json.dumps(marker))
    with pytest.raises(FairllavaError, match=f"{data}: rebuilt on this machine, {rel} differs"):
        _sweep(out)
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == {**before, data / "DONE.json":
                                                                          json.dumps(marker).encode()}
    assert not (out / victim.relative_to(src)).exists()
    (data / "DONE.json").write_bytes(before[data / "DONE.json"])
    # a damaged input of finished runs (seed 3's records edited) is rebuilt, proven equal and restored; no run redone
    records = out / "data" / "derm-vqa" / "seed3" / "S1" / "shortcut" / "test.jsonl"
    good = records.read_bytes()
    records.write_text("{}\n")
    res, logs = _sweep(out)
    assert records.read_bytes() == good and res.ran == [str(victim.relative_to(src))]
    stage1 = out / "stage1" / "derm-vqa" / "seed3" / "train" / "projector.safetensors"
    stage1.write_bytes(b"x")
    with pytest.raises(FairllavaError, match="finished runs were trained from it: restore it"):
        _sweep(out)


def test_an_embedded_base_must_be_the_model_its_runs_used(tmp_path, monkeypatch):
    """The embedded base lives in the user's cache, outside the sweep: on resume it is built if missing and its
    files must hash as the base step recorded them; a moved cache updates the record."""
    import fairllava.models.embedded as embedded
    from fairllava.benchmark.inputs import check_external_base, step_state
    from fairllava.benchmark.runner import Step

    plan = plan_from_dict({**_plan_dict(), "model": "embedded"}, "embedded.yaml")
    step, out = Step("base", "derm-vqa", 2), tmp_path / "sweep"
    cache = tmp_path / "cache" / "m"
    cache.mkdir(parents=True)
    (cache / "model.safetensors").write_bytes(b"weights")
    recorded = {"model.safetensors": manifest_sha(cache / "model.safetensors")}
    write_done(step.folder(out).mkdir(parents=True) or step.folder(out),
               {"external": True, "model_path": str(tmp_path / "gone"), "model_files": recorded})
    assert step_state(out, step)[0] == "pruned"
    monkeypatch.setattr(embedded, "ensure_embedded_vlm", lambda image_size, seed: cache)
    check_external_base(plan, out, step)
    assert read_done(step.folder(out))["model_path"] == str(cache)
    (cache / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(FairllavaError, match="differs from the one its runs used"):
        check_external_base(plan, out, step)


def manifest_sha(path: Path) -> str:
    from fairllava.benchmark.manifest import file_sha256

    return file_sha256(path)
