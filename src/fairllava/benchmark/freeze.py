"""Does the final plan hold exactly the settings the selection chose? (docs/protocol.md §3)

Why a check and not a hand copy: the protocol's value rests on the final runs using the validation split's
choices unchanged. ``fairllava benchmark check FINAL --against SELECTION_DIR`` compares, per task and per final
method, the *whole* resolved stage-2 TrainConfig with the one the selection ran:

- a method the selection tuned: its chosen trial's config;
- the baseline: the tuned baseline's chosen config (``lora-tuned``), else the selection's baseline;
- a method the selection did not tune (``fairllava-paper``): the selection's shared settings with this method's
  defaults (its kind and fairness preset; no own settings, since none were selected), built on the selection plan.

The baseline rule: a tuned baseline's chosen values (its learning rate) are every method's, except where a
method's own chosen trial sets the same key (``reweight``/``resample`` tune their own lr). Also compared: the
stage-1 config, the model, attribute, data settings (except the split sizes), generation and primary metric.
Paths, seeds and keys that do not change results (``checkpoint.RESUME_FREE``) are not compared.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Optional

from ..errors import FairllavaError
from .configs import PAPER_FAIRNESS_PRESET, stage1_config, stage2_config
from .plan import Plan

_MISSING = "<unset>"
# Run-specific paths and seeds: they differ between any two plans or runs and say nothing about the settings.
_IGNORED = {("model", "path"), ("model", "projector_path"), ("data", "train"), ("data", "image_root"),
            ("output_dir",), ("optim", "seed"), ("fairness", "seed")}
# Data settings that are not settings of the compared methods (the evaluated split's size; where the IU files are).
_DATA_FREE = {"n_val_per_cell", "n_test_per_cell", "iu_data_dir"}


def _leaves(d: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    if isinstance(d, dict) and d:
        out: dict[tuple, Any] = {}
        for k, v in d.items():
            out.update(_leaves(v, prefix + (k,)))
        return out
    return {prefix: d}


def _free(path: tuple) -> bool:
    from ..training.checkpoint import RESUME_FREE

    return path in _IGNORED or any(".".join(map(str, path[:i])) in RESUME_FREE for i in range(1, len(path) + 1))


def _resolved(cfg: dict) -> dict[tuple, Any]:
    """Leaves of the config as TrainConfig reads it (``lr: 1e-4`` typed as a string and 0.0001 are equal)."""
    from ..training.config import TrainConfig

    return {p: v for p, v in _leaves(TrainConfig.from_dict(copy.deepcopy(cfg), where="config").to_dict()).items()
            if not _free(p)}


def _stage2(plan: Plan, task: str, variant: str) -> dict[tuple, Any]:
    return _resolved(stage2_config(plan, task, 0, variant, "BASE", "DATA", "RUN", "PROJECTOR"))


def _with_method(sel: Plan, name: str, spec) -> Plan:
    """The selection plan with one more method (the final plan's, without its per-task settings)."""
    p = copy.copy(sel)
    p.__dict__.pop("_twins", None)  # runner.twin_of's cache belongs to the original's methods
    p.methods = {**sel.methods, name: dataclasses.replace(spec, settings={}, task_settings={}, trials=[])}
    return p


def frozen_check(final: Plan, selections: list[tuple[Plan, dict]]) -> list[dict]:
    """One row per compared item (a mismatch, or one ``ok`` row per method and shared block)."""
    rows: list[dict] = []

    def add(task, method, chosen, setting, want, have, what, ok=None):
        rows.append({"task": task, "method": method, "chosen": chosen, "setting": setting, "selected": want,
                     "final": have, "what": what, "ok": want == have if ok is None else ok})

    if any(m.trials for m in final.methods.values()):
        name = next(n for n, m in final.methods.items() if m.trials)
        raise FairllavaError(f"{final.source}: methods.{name}.trials: a final plan runs one setting per method; write "
                             "the chosen trial into task_settings")
    covered = set()
    for sel, board in selections:
        base_kind = sel.methods[sel.baseline].method
        for task, choices in (board.get("selection") or {}).items():
            covered.add(task)
            if task not in final.tasks:
                add(task, "-", "-", "task", task, _MISSING, "task of the selection missing from the final plan")
                continue
            _shared(final, sel, task, add)
            chosen_of: dict[str, tuple[str, Optional[str]]] = {}  # final method -> (selection entry, chosen variant)
            no_choice: set = set()
            tuned_baselines = [e for e in choices if sel.methods[e].method == base_kind and e != sel.baseline]
            if len(tuned_baselines) > 1:
                raise FairllavaError(f"selection {sel.name}: {len(tuned_baselines)} tuned entries of the baseline's "
                                     f"method ({', '.join(tuned_baselines)}); the baseline rule needs exactly one")
            for entry, info in choices.items():
                target = final.baseline if entry in tuned_baselines else entry
                if info.get("chosen") is None:
                    add(task, target, None, "trial", "a chosen trial", _MISSING, info.get("reason", "no choice"))
                    no_choice.add(target)
                    continue
                if target not in final.methods:
                    add(task, target, info["chosen"], "method", target, _MISSING, "method missing from the final plan")
                    continue
                chosen_of[target] = (entry, info["chosen"])
            rule: dict[tuple, Any] = {}  # the tuned baseline's chosen values: every method's shared ones
            tuned = chosen_of.get(final.baseline)
            if tuned is not None:
                trial = _leaves(sel.method_variants()[tuned[1]][1] or {})
                rule = {p: v for p, v in _stage2(sel, task, tuned[1]).items() if p in trial}
            for method in final.method_variants():
                if method in chosen_of:
                    entry, variant = chosen_of[method]
                    want, label = _stage2(sel, task, variant), variant
                    own = set(_leaves(sel.method_variants()[variant][1] or {}))
                elif method in sel.methods and not sel.methods[method].trials:
                    want, label, own = _stage2(sel, task, method), "(not tuned)", set()
                elif method not in sel.methods:  # nothing was selected for it: only the paper's block, unchanged
                    spec = final.methods[method]
                    preset = spec.fairness_preset or PAPER_FAIRNESS_PRESET
                    if spec.method != "fairllava" or preset != PAPER_FAIRNESS_PRESET:
                        add(task, method, "-", "method", "a method of the selection, or the paper's estimator "
                            f"(fairllava, preset {PAPER_FAIRNESS_PRESET})", f"{spec.method} "
                            f"(preset {spec.fairness_preset})", "method with no selection budget")
                        continue
                    want, label, own = _stage2(_with_method(sel, method, spec), task, method), "(not tuned)", set()
                else:
                    if method not in no_choice:
                        add(task, method, "-", "trial", "a chosen trial", _MISSING,
                            "tuned in the selection, but no chosen trial maps to this final method")
                    continue
                want = {**want, **{p: v for p, v in rule.items() if p not in own or method == final.baseline}}
                _rows(task, method, want, _stage2(final, task, method),
                      "chosen settings" if method in chosen_of else "settings (baseline rule applied)", add, label)
    for task in final.tasks:
        if task not in covered:
            add(task, "-", "-", "selection", "a selection of this task", _MISSING,
                "no selection folder covers this task of the final plan")
    return rows


def _shared(final: Plan, sel: Plan, task: str, add) -> None:
    """Everything both plans share beyond the methods: stage 1, model, attribute, data, generation, endpoint."""
    want: dict = {"model": sel.model, "attribute": sel.attribute, "primary_metric": sel.primary_metric(task),
                  "system_prompt": sel.system_prompt, "training.stage1_strength": sel.training.stage1_strength}
    have: dict = {"model": final.model, "attribute": final.attribute, "primary_metric": final.primary_metric(task),
                  "system_prompt": final.system_prompt, "training.stage1_strength": final.training.stage1_strength}
    for spec, out in ((sel.tasks[task], want), (final.tasks[task], have)):
        out.update({f"data.{k}": v for k, v in vars(spec.data).items() if k not in _DATA_FREE})
        out.update({f"generation.{k}": v for k, v in vars(spec.generation).items()})
    _rows(task, "(shared)", want, have, "shared setting drifted", add)
    _rows(task, "(stage 1)", _resolved(stage1_config(sel, task, 0, "BASE", "DATA", "RUN")),
          _resolved(stage1_config(final, task, 0, "BASE", "DATA", "RUN")), "stage-1 setting drifted", add)


def _rows(task, method, want: dict, have: dict, what: str, add, chosen: str = "-") -> None:
    """A row per differing key, or one ``ok`` row saying how many keys were compared."""
    name = (lambda p: ".".join(map(str, p)) if isinstance(p, tuple) else p)
    bad = [p for p in sorted(set(want) | set(have), key=str) if want.get(p, _MISSING) != have.get(p, _MISSING)]
    for p in bad:
        add(task, method, chosen, name(p), want.get(p, _MISSING), have.get(p, _MISSING), what)
    if not bad:
        add(task, method, chosen, f"all {len(want)} settings", "same", "same", what, ok=True)


def frozen_markdown(rows: list[dict], mismatches_only: bool = False) -> str:
    lines = ["| task | method | chosen | setting | selected | final plan | check |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if mismatches_only and r["ok"]:
            continue
        lines.append(f"| {r['task']} | {r['method']} | {r['chosen']} | {r['setting']} | {r['selected']} | "
                     f"{r['final']} | {'ok' if r['ok'] else 'MISMATCH: ' + r['what']} |")
    return "\n".join(lines) + "\n"


def load_selection(folder: str | Path) -> tuple[Plan, dict]:
    """A finished selection results folder: its plan and its leaderboard (with the ``selection`` section)."""
    from .report import read_leaderboard
    from .runner import load_folder_plan

    folder = Path(folder)
    if not (folder / "leaderboard.json").is_file():
        raise FairllavaError(f"{folder}: no leaderboard.json (run `fairllava benchmark report {folder}` first)")
    plan, board = load_folder_plan(folder), read_leaderboard(folder)
    if board.get("plan_hash") != plan.hash:
        raise FairllavaError(f"{folder}: leaderboard.json was made for plan {board.get('plan_hash')}, the folder's plan "
                             f"is {plan.hash}; rebuild it with `fairllava benchmark report {folder}`")
    if board.get("partial"):
        raise FairllavaError(f"{folder}: the selection leaderboard is partial ({board['runs']['finished']} of "
                             f"{board['runs']['total']} runs); finish the selection before freezing the final plan")
    return plan, board


def check_frozen(final: Plan, folders: list[str | Path]) -> list[dict]:
    """Rows of :func:`frozen_check` for finished selection folders (their seeds must be the declared ones)."""
    selections = [load_selection(f) for f in folders]
    for f, (sel, _) in zip(folders, selections):
        for task in sel.tasks:
            if task in final.tasks and sel.seeds(task, "val") != final.tasks[task].seeds.selection:
                raise FairllavaError(f"{f}: selected on seeds {sel.seeds(task, 'val')} of {task}, but the final plan "
                                     f"declares selection seeds {final.tasks[task].seeds.selection}")
    return frozen_check(final, selections)
