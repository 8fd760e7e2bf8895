"""The benchmark runner: every (task, strength, seed, method, split) run of a plan, resumable, N at a time.

Why this shape: the final grid is hours of CPU and must survive kills and span sessions. The sweep is a
small dependency graph of steps, each in its own folder with a ``DONE.json`` manifest (manifest.py):

    base/<task>/seed<k>/                 the base VLM (tiny: saved here; embedded: a pointer to the cache)
    data/<task>/seed<k>/S<s>/            the rendered benchmark (prepare_shortcut)
    stage1/<task>/seed<k>/               projector alignment, shared by every strength and method of the seed
    runs/<task>/S<s>/seed<k>/<method>/<split>/
        train/  generate/  evaluate/  [audit/]  DONE.json

A finished step is never redone; a corrupt one (files changed after DONE.json) is reported by path and
re-run; an unfinished one continues (training from its last checkpoint, generation from its partial file).
The folder is committed as it grows (its ``.gitignore`` leaves out the bulky files manifest.PRUNABLE names), so
a fresh clone resumes it: a finished run without its weights stays finished, and a rendered benchmark or a base
model that a remaining step needs is rebuilt and checked bit for bit against its recorded hashes.
``jobs > 1`` runs steps as worker subprocesses with ``threads`` CPU threads each; their output goes to
``logs/``. Every run's numbers depend on the thread count only through float rounding, which the
manifest records.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import FairllavaError
from ..io import atomic_dir, atomic_write_json, atomic_write_text
from .inputs import check_external_base, rebuild_input, step_state
from .manifest import (PRUNABLE, SWEEP_GITIGNORE, check_done, file_sha256, finished, folder_hashes, read_done,
                       threads_env, write_done)
from .plan import EVAL_TASK, STATE_FILE, Plan, check_results_folder, folder_identity, plan_from_dict


def strength_tag(s: float) -> str:
    return f"S{float(s):g}"


@dataclass(frozen=True)
class Step:
    """One node of the sweep graph; ``id`` is also its folder relative to the results folder."""

    kind: str  # base | data | stage1 | run
    task: str
    seed: int
    strength: Optional[float] = None
    variant: Optional[str] = None
    split: Optional[str] = None

    @property
    def id(self) -> str:
        if self.kind == "base":
            return f"base/{self.task}/seed{self.seed}"
        if self.kind == "data":
            return f"data/{self.task}/seed{self.seed}/{strength_tag(self.strength)}"
        if self.kind == "stage1":
            return f"stage1/{self.task}/seed{self.seed}"
        return f"runs/{self.task}/{strength_tag(self.strength)}/seed{self.seed}/{self.variant}/{self.split}"

    def folder(self, out: Path) -> Path:
        return out / self.id


def plan_steps(plan: Plan) -> list[Step]:
    """Every step in dependency order (a step's inputs come before it)."""
    steps: list[Step] = []
    seen: set = set()

    def add(s: Step) -> None:
        if s not in seen:
            seen.add(s)
            steps.append(s)

    for task, spec in plan.tasks.items():
        seeds = sorted({k for split in plan.splits for k in plan.seeds(task, split)})
        for seed in seeds:
            add(Step("base", task, seed))
            add(Step("data", task, seed, plan.training.stage1_strength))
            for s in spec.strengths:
                add(Step("data", task, seed, s))
            add(Step("stage1", task, seed))
    for task, spec in plan.tasks.items():
        for split in plan.splits:
            for seed in plan.seeds(task, split):
                for s in spec.strengths:
                    for variant in plan.method_variants():
                        if plan.runs_at(variant, s):
                            add(Step("run", task, seed, s, variant, split))
    return steps


def dependencies(plan: Plan, step: Step) -> list[Step]:
    if step.kind in ("base", "data"):
        return []
    if step.kind == "stage1":
        return [Step("base", step.task, step.seed), Step("data", step.task, step.seed, plan.training.stage1_strength)]
    deps = [Step("stage1", step.task, step.seed), Step("data", step.task, step.seed, step.strength),
            Step("base", step.task, step.seed)]
    twin = twin_of(plan, step)
    return deps + ([twin] if twin is not None else [])


def twin_of(plan: Plan, step: Step) -> Optional[Step]:
    """An earlier run of the same (task, seed, strength, split) with exactly this run's stage-2 settings, or None.

    Why: a selection gives the baseline the same trial budget as every method, so one of its trials repeats the
    shared settings, i.e. the `lora` run itself. Such a run is not trained and decoded twice: its ``train/`` and
    ``generate/`` are copied from the twin (its DONE.json names it); evaluation and the audit run as for any run.
    """
    if step.kind != "run":
        return None
    cache = plan.__dict__.setdefault("_twins", {})  # the sweep loop asks for dependencies many times a second
    if step not in cache:
        from .configs import stage2_config

        def key(variant: str) -> str:
            return json.dumps(stage2_config(plan, step.task, step.seed, variant, "BASE", "DATA", "RUN", "PROJECTOR"),
                              sort_keys=True, default=str)

        mine, cache[step] = key(step.variant), None
        for v in plan.method_variants():
            if v == step.variant:
                break
            if plan.runs_at(v, step.strength) and key(v) == mine:
                cache[step] = Step("run", step.task, step.seed, step.strength, v, step.split)
                break
    return cache[step]


# ---------------------------------------------------------------------------------------------- one step


def base_model_path(out: Path, step_task: str, seed: int) -> Path:
    marker = read_done(out / Step("base", step_task, seed).id)
    return Path(marker["model_path"]) if marker.get("external") else out / Step("base", step_task, seed).id / "model"


def execute_step(plan: Plan, out: Path, step: Step, threads: int, progress: bool = True) -> dict:
    """Run one step in this process and write its DONE.json; returns the marker."""
    import torch

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard loading bars: noise in a sweep's log
    folder = step.folder(out)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        info = {"base": _base, "data": _data, "stage1": _stage1, "run": _run}[step.kind](plan, out, step, progress)
    finally:
        torch.set_num_threads(old_threads)
    info = {"step": step.id, "plan_hash": plan.hash, "threads": threads,
            "seconds": round(time.perf_counter() - t0, 1), **(info or {})}
    if step.kind == "run":
        from .plan import machine_identity

        info["machine"] = machine_identity()
    return write_done(folder, info)


def _base(plan: Plan, out: Path, step: Step, progress: bool) -> dict:
    folder = step.folder(out)
    if plan.model == "embedded":
        from ..models.embedded import ensure_embedded_vlm

        path = ensure_embedded_vlm(image_size=plan.tasks[step.task].data.image_size, seed=step.seed)
        folder.mkdir(parents=True, exist_ok=True)  # the files a resumed sweep must find again (inputs.py)
        return {"external": True, "model_path": str(path), "model_files": folder_hashes(path)}
    from ..models.tiny import save_tiny_llava

    with atomic_dir(folder / "model", overwrite=True) as tmp:
        save_tiny_llava(tmp, seed=step.seed)
    return {"external": False}


def _data(plan: Plan, out: Path, step: Step, progress: bool) -> dict:
    from .prepare import prepare_shortcut

    d = plan.tasks[step.task].data
    folder = step.folder(out)
    prepare_shortcut(step.task, folder / "shortcut", seed=step.seed, strength=step.strength, n_train=d.n_train,
                     n_val_per_cell=d.n_val_per_cell, n_test_per_cell=d.n_test_per_cell, image_size=d.image_size,
                     minority_frac=d.minority_frac, evidence_probe=d.evidence_probe,
                     n_probe_per_cell=d.n_probe_per_cell, iu_data_dir=d.iu_data_dir, overwrite=True,
                     progress=progress)
    return {}


def data_dir(out: Path, task: str, seed: int, strength: float) -> Path:
    return Step("data", task, seed, strength).folder(out) / "shortcut"


def _train(cfg_dict: dict, run_dir: Path) -> None:
    from ..training.config import TrainConfig
    from ..training.trainer import train

    if not (run_dir / "run.json").is_file():
        if run_dir.exists() and not (run_dir / "checkpoints").is_dir():
            shutil.rmtree(run_dir)  # nothing to resume from (e.g. committed mid-way): start clean, no stale metrics
        train(TrainConfig.from_dict(cfg_dict), resume=run_dir.exists())
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the final weights are at the top of run_dir


def _stage1(plan: Plan, out: Path, step: Step, progress: bool) -> dict:
    from .configs import stage1_config

    folder = step.folder(out)
    data = data_dir(out, step.task, step.seed, plan.training.stage1_strength)
    cfg = stage1_config(plan, step.task, step.seed, str(base_model_path(out, step.task, step.seed)), str(data),
                        str(folder / "train"))
    cfg["logging"]["progress"] = progress and cfg["logging"].get("progress", True)
    _train(cfg, folder / "train")
    return {}


def _run(plan: Plan, out: Path, step: Step, progress: bool) -> dict:
    """stage 2 -> generation on the split -> evaluation [-> leakage audit], each in its own folder."""
    from ..generation import generate_predictions
    from ..models.loading import load_vlm
    from .configs import stage2_config

    folder = step.folder(out)
    if (folder / "train" / "run.json").is_file() and not any((folder / "train").glob("*.safetensors")):
        answered = (folder / "generate" / "predictions.jsonl").is_file()
        if not answered or (plan.audit.enabled and not (folder / "audit" / "audit.json").is_file()):
            shutil.rmtree(folder)  # unfinished, its weights left out of a commit, and it still needs them
    base = base_model_path(out, step.task, step.seed)
    data = data_dir(out, step.task, step.seed, step.strength)
    projector = Step("stage1", step.task, step.seed).folder(out) / "train" / "projector.safetensors"
    cfg = stage2_config(plan, step.task, step.seed, step.variant, str(base), str(data), str(folder / "train"),
                        str(projector))
    cfg["logging"]["progress"] = progress and cfg["logging"].get("progress", True)
    twin = twin_of(plan, step)
    if twin is not None and check_done(twin.folder(out))[0] != "ok":
        twin = None  # not finished (e.g. left out by --only), corrupt or pruned: this run trains for itself
    if twin is not None:
        parts = ("train", "generate")
        if not all((folder / p).is_dir() for p in parts):  # both from one finished source, never a mix
            for p in parts:
                shutil.rmtree(folder / p, ignore_errors=True)
            for p in parts:
                with atomic_dir(folder / p, overwrite=True) as tmp:
                    shutil.copytree(twin.folder(out) / p, tmp, dirs_exist_ok=True)
    t0 = time.perf_counter()
    _train(cfg, folder / "train")
    seconds = {"train": round(time.perf_counter() - t0, 1)}

    preds = folder / "generate" / "predictions.jsonl"
    records = data / f"{step.split}.jsonl"
    gen = plan.tasks[step.task].generation
    loaded = None  # (model, processor), loaded once for generation and the audit
    if not preds.is_file():
        t0 = time.perf_counter()
        loaded = load_vlm(base, dtype=cfg["model"]["dtype"], adapter=folder / "train")
        generate_predictions(*loaded, records, preds, image_root=data / "images", batch_size=gen.batch_size,
                             max_new_tokens=gen.max_new_tokens, max_length=gen.max_length, progress=progress,
                             system_prompt=plan.system_prompt)
        seconds["generate"] = round(time.perf_counter() - t0, 1)
    _evaluate(plan, step, data, preds, folder / "evaluate")
    if plan.audit.enabled and not (folder / "audit" / "audit.json").is_file():
        from .leakage import run_leakage_audit

        t0 = time.perf_counter()
        loaded = loaded or load_vlm(base, dtype=cfg["model"]["dtype"], adapter=folder / "train")
        run_leakage_audit(plan, step, *loaded, data, records, folder / "audit", progress)
        seconds["audit"] = round(time.perf_counter() - t0, 1)
    del loaded
    twin_info = ({"twin_of": twin.id, "twin_done_sha256": file_sha256(twin.folder(out) / "DONE.json")}
                 if twin is not None else {})
    return {"seconds_by_part": seconds, **twin_info}


def _stale_twin(out: Path, step: Step) -> str:
    """Why a finished copy of a twin run no longer matches its source ('' when it does or is no copy)."""
    marker = read_done(step.folder(out))
    src = marker.get("twin_of")
    if not src:
        return ""
    if not finished(check_done(out / src, PRUNABLE["run"])[0]):
        return f"its twin {src} is not finished any more"
    if file_sha256(out / src / "DONE.json") != marker.get("twin_done_sha256"):
        return f"its twin {src} was re-run after the copy"
    return ""


def _evaluate(plan: Plan, step: Step, data: Path, preds: Path, folder: Path) -> None:
    """The standard evaluation folder (EVALUATION.md §5.7) of this run's predictions, plus the shortcut signature."""
    if (folder / "metrics.json").is_file() and (folder / "signature.json").is_file():
        return
    from ..fairness import evaluate_predictions
    from ..report import write_evaluation
    from .stats import shortcut_signature

    card = json.loads((data / "datacard.json").read_text(encoding="utf-8"))
    task = EVAL_TASK[step.task]
    ev = plan.evaluation
    from .leaderboard import metrics_for
    from .stats import SIGNATURE

    wanted = sorted({"keyword_f1" if m.startswith("keyword_f1_") else m for m in metrics_for(plan, step.task)} - {SIGNATURE})
    result = evaluate_predictions(preds, task=task, labels=card["labels"] if task == "vqa" else None,
                                  attributes=[plan.attribute], metrics=wanted, n_boot=ev.n_boot, n_min=ev.n_min,
                                  seed=step.seed, run=step.id, progress=False)
    write_evaluation(result, folder, overwrite=True)
    atomic_write_json(folder / "signature.json", shortcut_signature(preds, card, step.task))


# ---------------------------------------------------------------------------------------------- the sweep


@dataclass
class SweepResult:
    out: Path
    done: list[str]
    ran: list[str]
    rerun_corrupt: list[str]
    seconds: float


def prepare_folder(plan: Plan, out: Path, plan_text: Optional[str] = None) -> None:
    """Check or create the results folder's identity (plan hash + code version); errors before any run."""
    check_results_folder(plan, out)
    if not (out / STATE_FILE).is_file():
        out.mkdir(parents=True, exist_ok=True)
        if plan_text is not None:
            atomic_write_text(out / "plan.yaml", plan_text)
        atomic_write_json(out / STATE_FILE, folder_identity(plan))
    ignore = out / ".gitignore"
    if not ignore.is_file() or ignore.read_text(encoding="utf-8") != SWEEP_GITIGNORE:
        atomic_write_text(ignore, SWEEP_GITIGNORE)


def run_sweep(plan: Plan, out: str | os.PathLike, *, jobs: int = 1, threads: Optional[int] = None,
              plan_text: Optional[str] = None, log: Callable[[str], None] = print, progress: bool = True,
              only: Optional[Callable[[Step], bool]] = None) -> SweepResult:
    """Run (or resume) every step of ``plan`` into ``out``."""
    import torch

    out = Path(out)
    if jobs < 1:
        raise FairllavaError(f"--jobs: expected >= 1, got {jobs}")
    adaptive = threads is None and jobs > 1  # a step that runs alone gets every core (stage 1, the last runs)
    threads = threads or (torch.get_num_threads() if jobs == 1 else max(1, (os.cpu_count() or 1) // jobs))
    if threads < 1:
        raise FairllavaError(f"--threads-per-job: expected >= 1, got {threads}")
    prepare_folder(plan, out, plan_text)
    steps = [s for s in plan_steps(plan) if only is None or only(s) or s.kind != "run"]
    done, todo, corrupt, inputs = [], [], [], []
    states = {s: step_state(out, s) for s in steps}
    for s in steps:
        state, why = states[s]
        stale = _stale_twin(out, s) if finished(state) and s.kind == "run" else ""
        if stale:  # checked once: it re-hashes the twin's DONE.json
            state, why = "corrupt", stale
        if finished(state):
            done.append(s)
            if s.kind != "run":
                inputs.append((s, state, why))
            continue
        if state == "corrupt" and s.kind != "run" and any(
                finished(states[d][0]) and s in dependencies(plan, d) for d in steps):
            done.append(s)  # finished runs were made from it: repaired below, provably unchanged, or an error
            inputs.append((s, state, why))
            continue
        if state == "corrupt":
            log(f"corrupt run folder {s.folder(out)} ({why}): re-running it")
            shutil.rmtree(s.folder(out))
            corrupt.append(s.id)
        elif state == "incomplete":
            log(f"unfinished step {s.folder(out)}: continuing it")
        todo.append(s)
    needed = {d for s in todo for d in dependencies(plan, s)}
    for s, state, why in inputs:
        if state == "corrupt" or (state == "pruned" and s in needed):
            log(f"rebuilding {s.folder(out)} ({why}); it must reproduce its recorded files")
            rebuild_input(plan, out, s, threads, progress)
        elif s in needed and s.kind == "base" and read_done(s.folder(out)).get("external"):
            check_external_base(plan, out, s)
    n_runs = sum(1 for s in steps if s.kind == "run")
    log(f"benchmark {plan.name}: {len(steps)} steps ({n_runs} runs), {len(done)} finished, {len(todo)} to do; "
        f"{jobs} job(s) x {threads} thread(s){' (more while fewer steps can run)' if adaptive else ''} -> {out}")
    t0 = time.perf_counter()
    clock = _Eta(len(steps), len(done), jobs, log)
    clock.expect(todo)
    if jobs == 1:
        for s in todo:
            started = time.perf_counter()
            execute_step(plan, out, s, threads, progress)
            clock.finished(s, time.perf_counter() - started)
    else:
        _run_parallel(plan, out, todo, jobs, threads, clock, log, adaptive=adaptive)
    return SweepResult(out, [s.id for s in done], [s.id for s in todo], corrupt, time.perf_counter() - t0)


class _Eta:
    """One plain line per finished step: counts and an ETA from this session's step times (per kind)."""

    def __init__(self, total: int, done: int, jobs: int, log: Callable[[str], None]) -> None:
        self.total, self.done, self.jobs, self.log = total, done, jobs, log
        self.times: dict[str, list[float]] = {}
        self.remaining: dict[str, int] = {}

    def expect(self, steps: list[Step]) -> None:
        for s in steps:
            self.remaining[s.kind] = self.remaining.get(s.kind, 0) + 1

    def finished(self, step: Step, seconds: float) -> None:
        from ..progress import format_seconds

        self.done += 1
        self.times.setdefault(step.kind, []).append(seconds)
        if self.remaining:
            self.remaining[step.kind] = max(0, self.remaining.get(step.kind, 1) - 1)
        eta = None
        if self.remaining:
            mean_all = sum(sum(v) for v in self.times.values()) / sum(len(v) for v in self.times.values())
            eta = sum(n * (sum(self.times[k]) / len(self.times[k]) if k in self.times else mean_all)
                      for k, n in self.remaining.items()) / self.jobs
        self.log(f"[{self.done}/{self.total}] {step.id} done in {format_seconds(seconds)}; "
                 f"ETA {format_seconds(eta) if eta is not None else '?'}")


def _worker_cmd(out: Path, step: Step, threads: int) -> list[str]:
    return [sys.executable, "-m", "fairllava.benchmark.worker", str(out), step.id, str(threads)]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the worker gets SIGKILL when the sweep process dies, so a killed sweep leaves no orphans."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_parallel(plan: Plan, out: Path, todo: list[Step], jobs: int, threads: int, clock: _Eta,
                  log: Callable[[str], None], adaptive: bool = False) -> None:
    """Up to ``jobs`` worker processes of ``threads`` threads; with ``adaptive``, a step that starts while fewer
    than ``jobs`` steps can run gets the idle cores too (threads change float rounding only, not the result's
    meaning; each run records its thread count)."""
    pending = list(todo)
    waiting_on = {s.id for s in todo}
    running: dict[str, tuple[subprocess.Popen, Step, float, object]] = {}
    failed: list[str] = []
    (out / "logs").mkdir(exist_ok=True)
    cpus = os.cpu_count() or 1
    last_beat = time.monotonic()
    while pending or running:
        ready = [s for s in pending if not any(d.id in waiting_on for d in dependencies(plan, s))]
        for s in ready:
            if len(running) >= jobs or failed:
                break
            can_run = len(running) + sum(1 for r in ready if r.id not in running)
            n_threads = threads_for_launch(threads, cpus, jobs, can_run) if adaptive else threads
            env = threads_env(n_threads)
            env["FAIRLLAVA_PROGRESS"] = "plain"
            logf = open(out / "logs" / (s.id.replace("/", "__") + ".log"), "ab")
            proc = subprocess.Popen(_worker_cmd(out, s, n_threads), stdout=logf, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
            running[s.id] = (proc, s, time.perf_counter(), logf)
            pending.remove(s)
        time.sleep(0.2)
        for sid, (proc, s, started, logf) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            logf.close()
            del running[sid]
            if rc == 0:
                waiting_on.discard(sid)
                clock.finished(s, time.perf_counter() - started)
            else:
                failed.append(sid)
                log(f"step {sid} failed (exit {rc}); see {out / 'logs' / (sid.replace('/', '__') + '.log')}")
        if failed and not running:
            break
        if time.monotonic() - last_beat >= _beat_interval() and running:
            last_beat = time.monotonic()
            log(f"running: {', '.join(running)}")
    if failed:
        raise FairllavaError(f"{len(failed)} step(s) failed: {', '.join(failed)} (logs in {out / 'logs'}); "
                             "rerun the same command to continue")


def threads_for_launch(threads: int, cpus: int, jobs: int, can_run: int) -> int:
    """Threads for a step launched while ``can_run`` steps (itself included) could run: the cores are shared among
    at most ``jobs`` of them, never fewer than ``threads`` each."""
    return max(threads, cpus // max(1, min(jobs, can_run)))


def _beat_interval() -> float:
    from ..progress import plain_interval

    return plain_interval()


def load_folder_plan(out: Path) -> Plan:
    """The plan a results folder was made with (from its ``benchmark.json``)."""
    path = out / STATE_FILE
    if not path.is_file():
        raise FairllavaError(f"{out}: not a benchmark results folder (no {STATE_FILE})")
    return plan_from_dict(json.loads(path.read_text(encoding="utf-8"))["plan"], source=str(path))
