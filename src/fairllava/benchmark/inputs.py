"""The input steps of a sweep (base model, rendered data, stage 1) when a sweep resumes from a committed folder.

Why: a sweep's folder is committed as it grows and resumed on fresh machines (manifest.PRUNABLE), and its
finished runs were made from particular inputs. An input step may be pruned (its bulky files left out by git), or
damaged. Rebuilding it must never change what the remaining runs read: it is rebuilt in a scratch folder and
moved in only if every recorded file hashes as before; otherwise the sweep stops with an error that names the
folder and the file. A damaged stage 1 with finished runs trained from it cannot be proven equal by rebuilding on
another machine (training is not bit-identical across machines), so it is an error, never a silent retrain.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import FairllavaError
from ..io import atomic_dir, atomic_write_json
from .manifest import DONE, PRUNABLE, check_done, folder_hashes, read_done

if TYPE_CHECKING:  # pragma: no cover
    from .plan import Plan
    from .runner import Step

SCRATCH = ".rebuild.tmp"  # a leftover name: never hashed, never committed


def step_state(out: Path, step: "Step") -> tuple[str, str]:
    """check_done with the step kind's prunable files; an external base model missing on this machine is pruned."""
    folder = step.folder(out)
    state, why = check_done(folder, PRUNABLE.get(step.kind, ()))
    if state == "ok" and step.kind == "base":
        from ..models.embedded import _DONE_MARKER

        marker = read_done(folder)
        if marker.get("external") and not (Path(marker["model_path"]) / _DONE_MARKER).is_file():
            return "pruned", f"its model {marker['model_path']} is not on this machine"
    return state, why


def _first_difference(old: dict, new: dict) -> str:
    return sorted(set(old.items()) ^ set(new.items()))[0][0]


def rebuild_input(plan: "Plan", out: Path, step: "Step", threads: int, progress: bool = True) -> None:
    """Rebuild a pruned or damaged data / tiny-base step in a scratch folder; move it in only if its files hash
    exactly as its DONE.json recorded (the original record is kept)."""
    from .runner import execute_step

    folder = step.folder(out)
    if step.kind == "stage1":
        raise FairllavaError(f"{folder}: {check_done(folder)[1]}, and finished runs were trained from it: restore it "
                             f"(git checkout -- {folder}) or use a new --out")
    old = read_done(folder)
    if old.get("external"):
        return check_external_base(plan, out, step)
    scratch = out / SCRATCH
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        new = execute_step(plan, scratch, step, old.get("threads", threads), progress)
        if new["files"] != old["files"]:
            raise FairllavaError(f"{folder}: rebuilt on this machine, {_first_difference(old['files'], new['files'])} "
                                 "differs from the recorded file, so the finished runs of this folder used other "
                                 "inputs: finish the sweep on the machine kind that made it, or use a new --out")
        with atomic_dir(folder, overwrite=True) as tmp:
            shutil.copytree(step.folder(scratch), tmp, dirs_exist_ok=True)
            atomic_write_json(tmp / DONE, old)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_external_base(plan: "Plan", out: Path, step: "Step") -> None:
    """An embedded base lives in the user's cache: build it if this machine lacks it, and require the files the
    sweep's runs were made from (recorded as ``model_files``)."""
    from ..models.embedded import ensure_embedded_vlm

    folder = step.folder(out)
    old = read_done(folder)
    path = ensure_embedded_vlm(image_size=plan.tasks[step.task].data.image_size, seed=step.seed)
    recorded = old.get("model_files")
    if recorded is not None:
        now = folder_hashes(path)
        if now != recorded:
            raise FairllavaError(f"{path}: the base model of {folder} differs from the one its runs used "
                                 f"({_first_difference(recorded, now)}); rebuild it with the versions that made "
                                 "the sweep, or use a new --out")
    if Path(old["model_path"]) != path:  # another home folder on this machine
        atomic_write_json(folder / DONE, {**old, "model_path": str(path)})
