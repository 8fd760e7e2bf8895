"""The benchmark plan: one strict YAML file that fixes a sweep before any run starts (docs/protocol.md).

Why strict and up front: a pre-registered comparison is only worth its protocol. The plan names the tasks,
shortcut strengths, the seeds used for selection (validation split) and for the final test, every method
with its settings (TrainConfig overrides), the primary endpoint and the statistics; a misspelled key, an
unknown method or task, seeds shared between selection and test, or a results folder that another plan or
code version made are one-line errors before anything is trained.

Runs: a run is ``(task, strength, seed, method, split)``; ``split: val`` runs use the task's selection
seeds and ``split: test`` runs its test seeds, so the two never share a seed.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import FairllavaError
from ..io import stable_hash
from ..training.config import _build, _deep_merge, _read_yaml
from .rendering import TASKS, VOCAB_CONFIG

PLAN_VERSION = 1
SPLITS = ("val", "test")
SEED_SET = {"val": "selection", "test": "test"}
#: Primary endpoint per task (docs/protocol.md): the signed gap (advantaged - disadvantaged) of this metric.
DEFAULT_PRIMARY_METRIC = {"derm-vqa": "accuracy", "cxr-report": "keyword_f1_micro_14"}
EVAL_TASK = {"derm-vqa": "vqa", "cxr-report": "report"}
MODEL_KINDS = ("tiny", "embedded")


@dataclass
class SeedSets:
    """Seeds for hyperparameter selection (validation split) and for the final numbers (test split)."""

    selection: list = field(default_factory=lambda: [0, 1])
    test: list = field(default_factory=list)


@dataclass
class DataSettings:
    """``prepare_shortcut`` arguments other than task, seed and strength (docs/benchmark.md)."""

    n_train: int = 1200
    n_val_per_cell: int = 10
    n_test_per_cell: int = 50
    image_size: int = 128
    minority_frac: float = 0.3
    evidence_probe: bool = False
    n_probe_per_cell: int = 100
    iu_data_dir: Optional[str] = None


@dataclass
class GenerationSettings:
    max_new_tokens: int = 8
    batch_size: int = 16
    max_length: int = 512


@dataclass
class TaskSpec:
    seeds: SeedSets = field(default_factory=SeedSets)
    strengths: list = field(default_factory=lambda: [1.0, 0.0])
    data: DataSettings = field(default_factory=DataSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    primary_metric: Optional[str] = None  # None = DEFAULT_PRIMARY_METRIC[task]
    training: dict = field(default_factory=dict)  # TrainConfig overrides for this task (both stages), e.g. steps
    # TrainConfig overrides for this task's stage 2 only: e.g. a task whose baseline needs a longer training to
    # learn the task at all (docs/protocol.md section 2), without changing its shared stage-1 projector.
    stage2: dict = field(default_factory=dict)


@dataclass
class TrainingSettings:
    """Shared by every run: stage 1 (projector alignment, one per task x seed) and stage-2 defaults."""

    stage1: dict = field(default_factory=lambda: {"optim": {"lr": 1e-3, "per_device_batch_size": 8, "max_steps": 30}})
    stage2: dict = field(default_factory=lambda: {"optim": {"lr": 2e-4, "per_device_batch_size": 8, "max_steps": 100}})
    # Stage 1 is shared by every strength of a seed, so it is trained on one of them: the S = 0 rendering by
    # default (the projector never sees the shortcut; only stage 2 differs between S = 1 and the S = 0 control).
    stage1_strength: float = 0.0


@dataclass
class MethodSpec:
    """One compared method: a TrainConfig ``method`` plus settings (nested TrainConfig overrides)."""

    method: str
    settings: dict = field(default_factory=dict)
    # fairllava: the packaged training preset whose fairness block (the paper's estimator) is the starting
    # point, its attributes replaced by the benchmark's shortcut attribute.
    fairness_preset: Optional[str] = None
    # Selection plans: alternatives, each deep-merged over ``settings``; every method gets ``trial_budget`` of them.
    trials: list = field(default_factory=list)
    # Final plans: per task, overrides deep-merged over ``settings`` (the selection chooses per task; `fairllava
    # benchmark check FINAL --against SELECTION_DIR` verifies they are the chosen ones). Not with ``trials``.
    task_settings: dict = field(default_factory=dict)
    # The shortcut strengths this method runs at; None = every strength of every task. Why: a final plan may run
    # the S = 0 control for the baseline alone (protocol §8), where each extra run costs an hour of CPU.
    strengths: Optional[list] = None
    description: Optional[str] = None


@dataclass
class EvaluationSettings:
    n_boot: int = 1000
    n_perm: int = 1000
    n_min: int = 20
    alpha: float = 0.05
    level: float = 0.95


@dataclass
class AuditSettings:
    """Leakage audit of each trained model on the evaluated split: a within-label linear probe of the shortcut
    attribute at hidden-state index 0 and at the layer the paper's estimator regularises (``regularised``)."""

    enabled: bool = False
    layers: list = field(default_factory=lambda: [0, "regularised"])
    folds: int = 5
    n_boot: int = 200


@dataclass
class PrimarySpec:
    """The pre-declared primary family: each non-baseline method x task at this strength, Holm-adjusted."""

    strength: float = 1.0
    methods: Optional[list] = None  # None = every method except the baseline
    # The tasks the family spans when it is split over one final plan per task (None = this plan's tasks): a
    # leaderboard missing one of them is partial and its Holm-adjusted verdicts are provisional.
    family_tasks: Optional[list] = None


@dataclass
class Plan:
    name: str
    model: str
    tasks: dict
    methods: dict
    splits: list = field(default_factory=lambda: ["test"])
    baseline: str = "lora"
    attribute: str = "race"
    trial_budget: Optional[int] = None
    training: TrainingSettings = field(default_factory=TrainingSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    primary: PrimarySpec = field(default_factory=PrimarySpec)
    system_prompt: Optional[str] = None
    description: Optional[str] = None
    source: str = field(default="plan", compare=False)

    # ------------------------------------------------------------------ identity
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    @property
    def hash(self) -> str:
        """A hash of everything that changes results (the plan file's name and comments do not). Keys added to
        the schema after version 1 are left out while they hold their default, so an unchanged plan keeps its
        hash when the schema grows."""
        d = self.to_dict()
        for spec in d["tasks"].values():
            if not spec.get("stage2"):
                spec.pop("stage2", None)
        for spec in d["methods"].values():
            if not spec.get("task_settings"):
                spec.pop("task_settings", None)
            if spec.get("strengths") is None:
                spec.pop("strengths", None)
        if d["primary"].get("family_tasks") is None:
            d["primary"].pop("family_tasks", None)
        return f"{stable_hash(json.dumps(d, sort_keys=True)):016x}"

    # ------------------------------------------------------------------ runs
    def method_variants(self) -> dict[str, tuple[str, dict]]:
        """Run name -> (method entry, merged settings); one name per trial in selection plans."""
        out = {}
        for name, m in self.methods.items():
            if not m.trials:
                out[name] = (name, copy.deepcopy(m.settings))
            for k, trial in enumerate(m.trials):
                out[f"{name}-t{k}"] = (name, _deep_merge(copy.deepcopy(m.settings), trial))
        return out

    def runs_at(self, variant: str, strength: float) -> bool:
        """Whether the run name ``variant`` (a method or one of its trials) runs at shortcut ``strength``."""
        listed = self.methods[self.method_variants()[variant][0]].strengths
        return listed is None or float(strength) in listed

    def seeds(self, task: str, split: str) -> list[int]:
        return list(getattr(self.tasks[task].seeds, SEED_SET[split]))

    def primary_metric(self, task: str) -> str:
        return self.tasks[task].primary_metric or DEFAULT_PRIMARY_METRIC[task]


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan YAML; every error names the file and the key."""
    path = Path(path)
    return plan_from_dict(_read_yaml(path), str(path))


def plan_from_dict(data: dict, source: str = "plan") -> Plan:
    data = dict(data)
    for key in ("tasks", "methods"):
        if key not in data:
            raise FairllavaError(f"{source}: {key}: missing required key")
        if not isinstance(data[key], dict) or not data[key]:
            raise FairllavaError(f"{source}: {key}: expected a non-empty mapping")
    unknown = [t for t in data["tasks"] if t not in TASKS]
    if unknown:
        raise FairllavaError(f"{source}: tasks.{unknown[0]}: unknown task (known: {', '.join(TASKS)})")
    tasks = {t: _build(TaskSpec, v or {}, f"{source}: tasks.{t}") for t, v in data["tasks"].items()}
    methods = {}
    for name, v in data["methods"].items():
        if not isinstance(v, dict):
            raise FairllavaError(f"{source}: methods.{name}: expected a mapping with at least `method:`")
        methods[str(name)] = _build(MethodSpec, v, f"{source}: methods.{name}")
    rest = {k: v for k, v in data.items() if k not in ("tasks", "methods")}
    plan = _build(Plan, {**rest, "tasks": {}, "methods": {}}, source)
    plan.tasks, plan.methods, plan.source = tasks, methods, source
    validate_plan(plan)
    return plan


def _int_list(values: Any, where: str) -> list[int]:
    if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise FairllavaError(f"{where}: expected a list of non-negative integers, got {values!r}")
    if len(set(values)) != len(values):
        raise FairllavaError(f"{where}: seeds listed twice in {values!r}")
    return values


def validate_plan(plan: Plan) -> None:
    """Cross-field rules; raises FairllavaError naming the plan file and key."""
    from ..training.config import METHODS

    src = plan.source
    if plan.model not in MODEL_KINDS:
        raise FairllavaError(f"{src}: model: expected one of {list(MODEL_KINDS)}, got {plan.model!r}")
    if plan.attribute not in VOCAB_CONFIG:
        raise FairllavaError(f"{src}: attribute: expected one of {list(VOCAB_CONFIG)}, got {plan.attribute!r}")
    if not plan.splits or any(s not in SPLITS for s in plan.splits) or len(set(plan.splits)) != len(plan.splits):
        raise FairllavaError(f"{src}: splits: expected a non-empty list of {list(SPLITS)}, got {plan.splits!r}")
    for t, spec in plan.tasks.items():
        where = f"{src}: tasks.{t}"
        sel = _int_list(spec.seeds.selection, f"{where}.seeds.selection")
        test = _int_list(spec.seeds.test, f"{where}.seeds.test")
        both = sorted(set(sel) & set(test))
        if both:
            raise FairllavaError(f"{where}.seeds: seeds {both} are in both selection and test; they must not overlap")
        for split in plan.splits:
            if not plan.seeds(t, split):
                raise FairllavaError(f"{where}.seeds.{SEED_SET[split]}: the plan evaluates split {split!r} "
                                     "but lists no seeds for it")
        if (not isinstance(spec.strengths, list) or not spec.strengths
                or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s <= 1 for s in spec.strengths)):
            raise FairllavaError(f"{where}.strengths: expected a non-empty list of numbers in [0, 1], got {spec.strengths!r}")
        if len(set(spec.strengths)) != len(spec.strengths):
            raise FairllavaError(f"{where}.strengths: a strength is listed twice in {spec.strengths!r}")
        spec.strengths = [float(s) for s in spec.strengths]
        _check_data(spec.data, t, f"{where}.data")
        if spec.primary_metric is not None:
            _check_metric(t, spec.primary_metric, f"{where}.primary_metric")
    # A fairllava method's estimator block is its preset's plus its own settings (configs.stage2_config); a
    # `fairness` block among the shared settings would be replaced there, i.e. silently ignored: refuse it.
    shared = [("training.stage1", plan.training.stage1), ("training.stage2", plan.training.stage2)]
    shared += [(f"tasks.{t}.{k}", getattr(spec, k)) for t, spec in plan.tasks.items() for k in ("training", "stage2")]
    for where, block in shared:
        if isinstance(block, dict) and "fairness" in block:
            raise FairllavaError(f"{src}: {where}.fairness: estimator settings belong to a method's settings or "
                                 "trials (a fairllava method's fairness block is its preset's plus its own)")
    if not 0 <= plan.training.stage1_strength <= 1:
        raise FairllavaError(f"{src}: training.stage1_strength: expected a number in [0, 1]")
    for name, m in plan.methods.items():
        if m.method not in METHODS:
            raise FairllavaError(f"{src}: methods.{name}.method: unknown method {m.method!r} "
                                 f"(known: {', '.join(METHODS)})")
        if m.fairness_preset is not None and m.method != "fairllava":
            raise FairllavaError(f"{src}: methods.{name}.fairness_preset: only for method fairllava")
        if any(not isinstance(t, dict) for t in m.trials):
            raise FairllavaError(f"{src}: methods.{name}.trials: expected a list of settings mappings")
        if not isinstance(m.task_settings, dict) or any(not isinstance(v, dict) for v in m.task_settings.values()):
            raise FairllavaError(f"{src}: methods.{name}.task_settings: expected a mapping task -> settings mapping")
        stray = [t for t in m.task_settings if t not in plan.tasks]
        if stray:
            raise FairllavaError(f"{src}: methods.{name}.task_settings.{stray[0]}: not a task of this plan "
                                 f"(tasks: {', '.join(plan.tasks)})")
        if m.task_settings and m.trials:
            raise FairllavaError(f"{src}: methods.{name}: task_settings and trials together (trials are for "
                                 "selection plans, task_settings for the final plan)")
    all_strengths = {s for spec in plan.tasks.values() for s in spec.strengths}
    primary_methods = plan.primary.methods or [m for m in plan.methods if m != plan.baseline]
    for name, m in plan.methods.items():
        if m.strengths is None:
            continue
        where = f"{src}: methods.{name}.strengths"
        if (not isinstance(m.strengths, list) or not m.strengths or len(set(m.strengths)) != len(m.strengths)
                or any(isinstance(s, bool) or not isinstance(s, (int, float)) for s in m.strengths)):
            raise FairllavaError(f"{where}: expected a non-empty list of distinct numbers, got {m.strengths!r}")
        m.strengths = [float(s) for s in m.strengths]
        stray = [s for s in m.strengths if s not in all_strengths]
        if stray:
            raise FairllavaError(f"{where}: {stray[0]} is not a strength of any task (tasks' strengths: "
                                 f"{sorted(all_strengths)})")
        if name == plan.baseline and set(m.strengths) != all_strengths:
            raise FairllavaError(f"{where}: the baseline runs at every strength (it is every comparison's reference)")
        if name in primary_methods and float(plan.primary.strength) not in m.strengths:
            raise FairllavaError(f"{where}: a primary method runs at the primary strength {plan.primary.strength}")
    if plan.baseline not in plan.methods or plan.methods[plan.baseline].trials:
        raise FairllavaError(f"{src}: baseline: {plan.baseline!r} must name a method without trials "
                             f"(methods: {', '.join(plan.methods)})")
    if plan.trial_budget is not None:
        for name, m in plan.methods.items():
            n = len(m.trials) or 1
            if n != plan.trial_budget and name != plan.baseline:
                raise FairllavaError(f"{src}: methods.{name}: {n} trial(s), but trial_budget is {plan.trial_budget} "
                                     "(every method gets the same number of trials)")
    names = plan.method_variants()
    if len(names) != sum(len(m.trials) or 1 for m in plan.methods.values()):
        raise FairllavaError(f"{src}: methods: trial names collide with another method's name")
    for prim in plan.primary.methods or []:
        if prim not in plan.methods or prim == plan.baseline:
            raise FairllavaError(f"{src}: primary.methods: {prim!r} is not a non-baseline method of the plan")
    ft = plan.primary.family_tasks
    if ft is not None:
        if not isinstance(ft, list) or any(t not in TASKS for t in ft) or not set(plan.tasks) <= set(ft):
            raise FairllavaError(f"{src}: primary.family_tasks: expected a list of tasks ({', '.join(TASKS)}) that "
                                 f"includes every task of this plan ({', '.join(plan.tasks)}), got {ft!r}")
    if not any(plan.primary.strength in spec.strengths for spec in plan.tasks.values()):
        raise FairllavaError(f"{src}: primary.strength: {plan.primary.strength} is not a strength of any task")
    for layer in plan.audit.layers:
        if layer != "regularised" and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise FairllavaError(f"{src}: audit.layers: expected hidden-state indices or 'regularised', got {layer!r}")
    ev = plan.evaluation
    if ev.n_boot < 0 or ev.n_perm < 0 or ev.n_min < 1 or not 0 < ev.alpha < 1 or not 0 < ev.level < 1:
        raise FairllavaError(f"{src}: evaluation: expected n_boot >= 0, n_perm >= 0, n_min >= 1, 0 < alpha, level < 1")
    # Every run's TrainConfig must build (unknown keys, bad values) before anything is trained.
    from .configs import check_train_configs

    check_train_configs(plan)


def _check_data(d: DataSettings, task: str, where: str) -> None:
    from .rendering import ShortcutConfig

    try:
        ShortcutConfig(task=task, n_train=d.n_train, n_val_per_cell=d.n_val_per_cell, n_test_per_cell=d.n_test_per_cell,
                       image_size=d.image_size, minority_frac=d.minority_frac, n_probe_per_cell=d.n_probe_per_cell
                       ).validate()
    except ValueError as e:
        raise FairllavaError(f"{where}: {e}") from None


def _check_metric(task: str, metric: str, where: str) -> None:
    from ..fairness.evaluate import REPORT_METRICS, VQA_METRICS

    known = list(VQA_METRICS) if EVAL_TASK[task] == "vqa" else [m for m in REPORT_METRICS if m != "keyword_f1"] + [
        f"keyword_f1_{a}_{c}" for a in ("micro", "macro") for c in ("14", "5")]
    if metric not in known:
        raise FairllavaError(f"{where}: unknown metric {metric!r} for {task} (known: {', '.join(known)})")


# ---------------------------------------------------------------------- the results folder's identity
STATE_FILE = "benchmark.json"


def compute_identity() -> dict:
    """Where and in which precision this machine runs the plan's steps (``model.dtype: auto`` resolved): runs of
    one sweep must share it, since bf16 and fp32 runs are different measurements."""
    import torch

    from ..models.precision import canonical_dtype_name, resolve_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"device": device, "dtype": canonical_dtype_name(resolve_dtype("auto", device))}


def machine_identity() -> dict:
    """The processor a run ran on, recorded in its DONE.json and not checked on resume: runs of one sweep may come
    from CPUs of one compute dtype with different kernels (AMX or avx512_bf16 alone), which the board can then say."""
    import platform

    import torch

    if torch.cuda.is_available():
        return {"device": "cuda", "name": torch.cuda.get_device_name(0)}
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = f.read()
        name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), name)
    except OSError:  # pragma: no cover - not Linux
        info = ""
    return {"device": "cpu", "name": name, "capability": torch.backends.cpu.get_cpu_capability(),
            "amx_bf16": " amx_bf16" in info, "cores": os.cpu_count()}


def folder_identity(plan: Plan) -> dict:
    from .manifest import code_version

    return {"version": PLAN_VERSION, "plan_hash": plan.hash, "code": code_version(), "compute": compute_identity(),
            "plan": plan.to_dict()}


def check_results_folder(plan: Plan, out: Path) -> Optional[dict]:
    """The identity recorded in ``out`` (None for a new folder); error if another plan or code made it."""
    path = out / STATE_FILE
    if not path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise FairllavaError(f"{out}: not empty and not a benchmark results folder (no {STATE_FILE}); "
                                 "use a new --out")
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        old_hash, old_code = old["plan_hash"], old["code"]
    except (ValueError, KeyError, TypeError):
        raise FairllavaError(f"{path}: unreadable results-folder identity; use a new --out") from None
    if old_hash != plan.hash:
        raise FairllavaError(f"{out}: made by a different plan (hash {old_hash}, this plan {plan.hash}); "
                             "use a new --out or the plan that made it")
    from .manifest import code_version

    now = code_version()
    if old_code.get("code_hash") != now["code_hash"]:
        raise FairllavaError(f"{out}: made by another code version (commit {str(old_code.get('commit'))[:10]}, code "
                             f"{old_code.get('code_hash')}); this checkout is commit {str(now['commit'])[:10]}, code "
                             f"{now['code_hash']}: use a new --out or check out that commit")
    here = compute_identity()
    if old.get("compute") not in (None, here):
        was = old["compute"]
        raise FairllavaError(f"{out}: its runs ran on {was.get('device')} in {was.get('dtype')}; this machine runs "
                             f"{here['device']} in {here['dtype']}: finish the sweep on a machine of that kind or "
                             "use a new --out")
    return old
