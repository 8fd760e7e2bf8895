"""Does the DAC learn on the paper's pathway of the demo model? Real stage-2 runs, read at the health warm-up.

Issue 13's must-show, measured with the benchmark's own code path (``fairllava.benchmark``: the demo preset's
plan, its base model, data and stage 1; ``stage2_config`` for the stage-2 run): stage 1 once, then for each
estimator setting a ``fairllava`` stage-2 run (embedded demo VLM, LoRA on every LM linear, the shortcut attribute
``race``) of ``--warmup + 1`` optimizer steps at the paper's layer (``mi_layer_frac: 0.5`` -> hidden-state index
15 of 31 on SmolLM2, so the penalty reaches LoRA weights) with image tokens. Read: the held-out (prequential) DAC
balanced accuracy ``dac_bacc/race`` logged at the warm-up step, and whether the dead-DAC warning fired.

- ``paper``: the paper's literal estimator block (``paper_fairness("race")``, from the ``mimic_cxr`` preset: one
  random token, L2-normalised, DAC at the LoRA lr). Expected: the dead-DAC warning fires.
- ``recommended``: that block + ``fairllava.regularizer.config.RECOMMENDED_ESTIMATOR`` (standardised z, DAC lr
  1e-2, every image token, other-sample negatives, the penalty off until the check). Expected: ``dac_bacc/race``
  >= 0.75, no warning.
- ``recommended_no_warmup``: the same with the penalty from step 1 (recorded, no must-show).

Training data only: the metric scores training batches before the heads train on them; no validation or test
label is read. Resumable: a finished step or setting is not redone (rerun the same command). Everything goes
under ``--out`` (``bench/`` = base/data/stage1 of the benchmark runner, ``<setting>/`` = the stage-2 runs,
``summary.json``); exit status 1 when a must-show fails (``--preset smoke``: the tiny random model, a code-path
check only, whose PASS/FAIL lines are not evidence and never fail the exit status).

    python bench/dac_health.py --out runs/dac_health [--warmup 50] [--seed 0] [--json FILE]   # ~10 min, 2 cores
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

from fairllava.benchmark.configs import paper_fairness, stage2_config
from fairllava.benchmark.runner import Step, _train, base_model_path, data_dir, run_sweep
from fairllava.demo import SHORTCUT_ATTRIBUTE, demo_plan, get_preset
from fairllava.errors import FairllavaError
from fairllava.io import atomic_write_json
from fairllava.regularizer.config import RECOMMENDED_ESTIMATOR
from fairllava.regularizer.health import DeadDACWarning

# RECOMMENDED_ESTIMATOR includes a DAC warm-up (penalty off) as long as the health check; "recommended_no_warmup"
# (the penalty from step 1) is recorded beside it because it separates "the DAC cannot learn these states" from
# "the penalty already scrambled them" (docs/benchmark.md); it carries no must-show.
SETTINGS = {"paper": {}, "recommended": {**RECOMMENDED_ESTIMATOR, "dac_warmup_steps": "WARMUP"},
            "recommended_no_warmup": {**RECOMMENDED_ESTIMATOR, "dac_warmup_steps": 0}}
MUST_SHOW = {"paper": "the paper's literal estimator: the dead-DAC warning fires",
             "recommended": "paper block + RECOMMENDED_ESTIMATOR (its DAC warm-up = the check's): held-out DAC "
                            "balanced accuracy >= 0.75, no warning",
             "recommended_no_warmup": "recorded only: the same with the penalty from step 1"}
MIN_BACC = 0.75
DEFAULT_WARMUP = {"smoke": 10}  # the tiny model's code check needs only >= 64 samples seen (8 steps of 8)
PAPER_LAYER = {"mi_layer_frac": 0.5, "mi_layer_index": None, "mi_token_mode": "image"}


def prepare(out: Path, preset: str, seed: int):
    """Base model, rendered data and stage 1 of the demo preset's plan (the benchmark runner's resumable steps)."""
    p = get_preset(preset)
    plan = demo_plan(p, seed)
    bench = out / "bench"
    run_sweep(plan, bench, jobs=1, progress=False, only=lambda s: False)  # every non-run step, no stage-2 run
    base = base_model_path(bench, p.task, seed)
    projector = Step("stage1", p.task, seed).folder(bench) / "train" / "projector.safetensors"
    return p, plan, base, data_dir(bench, p.task, seed, p.strength), projector


def fairness_block(name: str, warmup: int, seed: int) -> dict:
    extra = {k: (warmup if v == "WARMUP" else v) for k, v in SETTINGS[name].items()}
    return {**paper_fairness(SHORTCUT_ATTRIBUTE, seed=seed), **extra, **PAPER_LAYER,
            "dac_health_warmup_steps": warmup, "on_dead_dac": "warn"}


def run_setting(name: str, out: Path, warmup: int, seed: int, prep) -> dict:
    p, plan, base, data, projector = prep
    run, train_dir = out / name, out / name / "train"
    cfg = stage2_config(plan, p.task, seed, "fairllava", str(base), str(data), str(train_dir), str(projector))
    cfg["fairness"] = fairness_block(name, warmup, seed)
    cfg["optim"]["max_steps"] = warmup + 1
    cfg["logging"].update({"every_n_steps": 1, "progress": False})
    cfg["checkpointing"]["every_n_steps"] = warmup + 1  # one checkpoint, at the end: a killed run restarts at 0
    ident = {"preset": p.name, "seed": seed, "warmup": warmup, "fairness": cfg["fairness"]}
    result_file = run / "dac_health.json"
    if result_file.is_file():
        res = json.loads(result_file.read_text(encoding="utf-8"))
        if res.get("identity") != json.loads(json.dumps(ident)):
            raise FairllavaError(f"{result_file}: holds a run with other settings (preset/seed/--warmup/estimator); "
                                 "use another --out or delete it")
        print(f"{name}: finished earlier ({result_file})")
        return {**res, "resumed": True}
    if (train_dir / "run.json").is_file():  # trained, but killed before its result was written: the warning is lost
        print(f"{name}: {train_dir} finished without a result file; retraining it to observe the warning")
        shutil.rmtree(train_dir)
    print(f"{name}: stage 2 fairllava, {warmup + 1} steps -> {train_dir}")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeadDACWarning)
        _train(cfg, train_dir)
    dead = [str(w.message) for w in caught if issubclass(w.category, DeadDACWarning)]
    at = _row_at(train_dir / "metrics.jsonl", warmup + 1)  # logged after the step that ran the check
    att = SHORTCUT_ATTRIBUTE
    res = {"setting": name, "identity": ident, "layer_index": _layer_index(base, cfg["fairness"]),
           "dac_bacc_at_warmup": _num(at.get(f"dac_bacc/{att}")), "dac_acc_at_warmup": _num(at.get(f"dac_acc/{att}")),
           "mi_at_warmup": _num(at.get(f"mi/{att}")), "warned": bool(dead), "warning": dead[0] if dead else None,
           "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(result_file, res)
    return {**res, "resumed": False}


def _row_at(path: Path, step: int) -> dict:
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    row = next((r for r in rows if r.get("step") == step and "phase" not in r), None)
    if row is None:
        raise FairllavaError(f"{path}: no logged row at step {step} (expected logging every step)")
    return row


def _num(x):
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _layer_index(base: Path, fairness: dict) -> int:
    """The hidden-state index the estimator taps on this base model (the regulariser's own rule)."""
    from fairllava.regularizer import FairnessConfig, FairnessRegularizer

    c = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    text = c.get("text_config") or c
    reg = FairnessRegularizer(FairnessConfig.from_dict(fairness), hidden_size=int(text["hidden_size"]))
    return int(reg.layer_indices(int(text["num_hidden_layers"]) + 1)[0])


def verdict(r: dict) -> tuple[bool, str]:
    b = r["dac_bacc_at_warmup"]
    shown = f"held-out bacc {'n/a' if b is None else f'{b:.3f}'}, warning {'yes' if r['warned'] else 'no'}"
    if r["setting"] == "paper":
        return r["warned"], shown
    if r["setting"] == "recommended_no_warmup":
        return True, shown
    return b is not None and b >= MIN_BACC and not r["warned"], shown


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for everything (resumable)")
    ap.add_argument("--warmup", type=int, default=None, help="fairness.dac_health_warmup_steps (default 50; smoke 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=None, choices=list(SETTINGS))
    ap.add_argument("--preset", default="full", help="demo preset whose base, data and stage 1 it uses (full = the benchmark sizes; smoke = the tiny random model, a code check)")
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    a = ap.parse_args()
    warmup = a.warmup if a.warmup is not None else DEFAULT_WARMUP.get(a.preset, 50)
    if warmup < 1:
        raise FairllavaError(f"--warmup: expected >= 1, got {warmup}")
    t0 = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    prep = prepare(a.out, a.preset, a.seed)
    results = [run_setting(n, a.out, warmup, a.seed, prep) for n in SETTINGS if not a.only or n in a.only]
    smoke = prep[0].model != "embedded"
    print("| setting | layer | held-out DAC balanced accuracy at the warm-up | per-batch accuracy | dead-DAC warning |")
    print("|---|---|---|---|---|")
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    for r in results:
        print(f"| {r['setting']} | {r['layer_index']} | {fmt(r['dac_bacc_at_warmup'])} | {fmt(r['dac_acc_at_warmup'])} "
              f"| {'yes' if r['warned'] else 'no'} |")
    checks = []
    for r in results:
        ok, shown = verdict(r)
        checks.append({"setting": r["setting"], "must_show": MUST_SHOW[r["setting"]], "pass": ok, "observed": shown})
        tag = " [smoke: tiny random model, not evidence]" if smoke else ""
        print(f"{'PASS' if ok else 'FAIL'} {r['setting']}: {MUST_SHOW[r['setting']]} ({shown}){tag}")
    summary = {"preset": a.preset, "model": prep[0].model, "seed": a.seed, "warmup": warmup,
               "attribute": SHORTCUT_ATTRIBUTE, "evidence": not smoke, "all_pass": all(c["pass"] for c in checks),
               "checks": checks, "results": results, "seconds_this_session": round(time.perf_counter() - t0, 1)}
    atomic_write_json(a.out / "summary.json", summary)
    if a.json is not None:
        atomic_write_json(a.json, summary)
    print(f"summary: {a.out / 'summary.json'}")
    return 0 if summary["all_pass"] or smoke else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FairllavaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
