"""Does the final plan hold exactly the settings the selection chose? (docs/protocol.md §3)

Why a check and not a hand copy: the protocol's value rests on the final runs using the validation split's
choices unchanged. ``fairllava benchmark check FINAL --against SELECTION_DIR`` compares, per task, every leaf of
each chosen trial's settings with the final plan's resolved stage-2 config for that method, applies the baseline
rule (a tuned baseline's chosen learning rate becomes every method's shared one, unless the method's own chosen
settings set it), and checks that the shared training settings did not drift between selection and final.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import FairllavaError
from .configs import stage2_config
from .plan import Plan

_MISSING = "<unset>"
# Run-specific paths: they differ between any two plans and say nothing about the settings.
_PATHS = {("model", "path"), ("model", "projector_path"), ("data", "train"), ("data", "image_root"), ("output_dir",)}


def _leaves(d: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    if isinstance(d, dict) and d:
        out: dict[tuple, Any] = {}
        for k, v in d.items():
            out.update(_leaves(v, prefix + (k,)))
        return out
    return {prefix: d}


def _get(cfg: dict, path: tuple) -> Any:
    for k in path:
        if not isinstance(cfg, dict) or k not in cfg:
            return _MISSING
        cfg = cfg[k]
    return cfg


def _config(plan: Plan, task: str, variant: str) -> dict:
    return stage2_config(plan, task, 0, variant, "BASE", "DATA", "RUN", "PROJECTOR")


def frozen_check(final: Plan, selections: list[tuple[Plan, dict]]) -> list[dict]:
    """One row per checked setting: task, final method, the selection's choice, setting path, values, ok."""
    rows: list[dict] = []

    def add(task, method, chosen, path, want, have, what):
        rows.append({"task": task, "method": method, "chosen": chosen, "setting": ".".join(map(str, path)),
                     "selected": want, "final": have, "what": what, "ok": want == have})

    for sel, board in selections:
        base_method = sel.methods[sel.baseline].method
        for task, choices in (board.get("selection") or {}).items():
            if task not in final.tasks:
                add(task, "-", "-", ("task",), task, _MISSING, "task of the selection missing from the final plan")
                continue
            shared_lr_paths: dict[tuple, Any] = {}
            own: dict[str, set] = {}
            for entry, info in choices.items():
                tuned_baseline = sel.methods[entry].method == base_method and entry != sel.baseline
                target = final.baseline if tuned_baseline else entry
                if info.get("chosen") is None:
                    add(task, target, None, ("trial",), "a chosen trial", _MISSING, info.get("reason", "no choice"))
                    continue
                if target not in final.methods:
                    add(task, target, info["chosen"], ("method",), target, _MISSING, "method missing from the final plan")
                    continue
                chosen_cfg, final_cfg = _config(sel, task, info["chosen"]), _config(final, task, target)
                paths = [p for p in _leaves(info["settings"] or {}) if p != ()]
                own[target] = set(paths)
                for p in paths:
                    add(task, target, info["chosen"], p, _get(chosen_cfg, p), _get(final_cfg, p), "chosen setting")
                if tuned_baseline:
                    shared_lr_paths.update({p: _get(chosen_cfg, p) for p in paths})
                if sel.methods[entry].fairness_preset != final.methods[target].fairness_preset:
                    add(task, target, info["chosen"], ("fairness_preset",), sel.methods[entry].fairness_preset,
                        final.methods[target].fairness_preset, "chosen setting")
            # The tuned baseline's choice is every method's shared setting, unless the method chose its own.
            for m in final.method_variants():
                for p, v in shared_lr_paths.items():
                    if m != final.baseline and p not in own.get(m, set()):
                        add(task, m, "baseline rule", p, v, _get(_config(final, task, m), p), "shared (baseline rule)")
            # Everything else the baseline trains with is the same in selection and final.
            s_cfg, f_cfg = _leaves(_config(sel, task, sel.baseline)), _leaves(_config(final, task, final.baseline))
            for p in sorted(set(s_cfg) | set(f_cfg), key=str):
                if p in _PATHS or p in shared_lr_paths:
                    continue
                want, have = s_cfg.get(p, _MISSING), f_cfg.get(p, _MISSING)
                if want != have:
                    add(task, final.baseline, "-", p, want, have, "shared setting drifted")
    return rows


def frozen_markdown(rows: list[dict]) -> str:
    lines = ["| task | method | chosen | setting | selected | final plan | check |", "|---|---|---|---|---|---|---|"]
    for r in rows:
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
    if board.get("partial"):
        raise FairllavaError(f"{folder}: the selection leaderboard is partial ({board['runs']['finished']} of "
                             f"{board['runs']['total']} runs); finish the selection before freezing the final plan")
    return plan, board


def check_frozen(final: Plan, folders: list[str | Path]) -> list[dict]:
    """Rows of :func:`frozen_check`; raises a one-line error naming the first mismatch."""
    selections = [load_selection(f) for f in folders]
    for f, (sel, _) in zip(folders, selections):
        for task in sel.tasks:
            if task in final.tasks and sel.seeds(task, "val") != final.tasks[task].seeds.selection:
                raise FairllavaError(f"{f}: selected on seeds {sel.seeds(task, 'val')} of {task}, but the final plan "
                                     f"declares selection seeds {final.tasks[task].seeds.selection}")
    return frozen_check(final, selections)
