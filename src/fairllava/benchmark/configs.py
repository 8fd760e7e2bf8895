"""TrainConfig dictionaries for the benchmark's stage 1 and stage-2 runs, built from the plan.

Why here: every run's training config is a pure function of the plan (plus paths), so the plan can be
checked by building all of them before anything trains, and a run's config can be read back and compared.
Order of precedence (later wins): fixed benchmark defaults < ``training.stage1|stage2`` < the task's
``training`` < the task's ``stage2`` (stage 2 only) < the fairness preset block (fairllava) < the method's
``settings`` < the trial, or the method's ``task_settings`` for this task (final plans; never both).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

from ..errors import FairllavaError
from ..training.config import _deep_merge
from .rendering import VOCAB_CONFIG

#: Benchmark defaults both stages start from (the demo's settings).
BASE_OPTIM = {"lr": 2e-4, "warmup_ratio": 0.03, "scheduler": "cosine", "grad_accum": 1}
BASE_LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
PAPER_FAIRNESS_PRESET = "mimic_cxr"


def paper_fairness(attribute: str, preset: str = PAPER_FAIRNESS_PRESET, seed: int = 42) -> dict:
    """The packaged preset's fairness block (the paper's estimator) on the benchmark's one shortcut attribute."""
    from ..training.config import preset_dict

    fair = copy.deepcopy(preset_dict(preset).get("fairness") or {})
    if not fair:
        raise FairllavaError(f"fairness_preset {preset!r}: the preset has no fairness block")
    fair["attributes"] = {attribute: {"num_classes": len(_classes(attribute)), "weight": 1.0}}
    fair["seed"] = int(seed)
    return fair


def _classes(attribute: str) -> list[str]:
    from ..data.attributes import vocabs_from_config

    return list(vocabs_from_config({attribute: VOCAB_CONFIG[attribute]})[attribute].classes)


def _common(plan, task: str, seed: int, stage: int, base: str, data: str, run_dir: str,
            projector: Optional[str]) -> dict:
    cfg: dict[str, Any] = {
        "model": {"path": str(base), "dtype": "auto", "projector_path": projector},  # bf16 where the CPU has it
        "data": {"train": str(Path(data) / "train.jsonl"), "image_root": str(Path(data) / "images"),
                 "attributes": {plan.attribute: VOCAB_CONFIG[plan.attribute]}, "max_length": 512,
                 "system_prompt": plan.system_prompt},
        "output_dir": str(run_dir),
        "stage": stage,
        "method": "lora",
        "lora": dict(BASE_LORA),
        "optim": dict(BASE_OPTIM),
        "checkpointing": {"every_n_steps": 25, "keep_last": 1},
        "logging": {"every_n_steps": 5, "tensorboard": False, "progress": True},
    }
    cfg = _deep_merge(cfg, plan.training.stage1 if stage == 1 else plan.training.stage2)
    cfg = _deep_merge(cfg, plan.tasks[task].training)
    if stage == 2:
        cfg = _deep_merge(cfg, plan.tasks[task].stage2)
    cfg["optim"]["seed"] = int(seed)
    return cfg


def stage1_config(plan, task: str, seed: int, base: str, data: str, run_dir: str) -> dict:
    cfg = _common(plan, task, seed, 1, base, data, run_dir, None)
    cfg["method"] = "lora"
    return cfg


def stage2_config(plan, task: str, seed: int, variant: str, base: str, data: str, run_dir: str,
                  projector: Optional[str]) -> dict:
    entry, settings = plan.method_variants()[variant]
    spec = plan.methods[entry]
    cfg = _common(plan, task, seed, 2, base, data, run_dir, projector)
    cfg["method"] = spec.method
    if spec.method == "fairllava":
        cfg["fairness"] = paper_fairness(plan.attribute, spec.fairness_preset or PAPER_FAIRNESS_PRESET, seed)
    cfg = _deep_merge(cfg, settings)
    cfg = _deep_merge(cfg, spec.task_settings.get(task, {}))
    if spec.method == "fairllava":
        cfg["fairness"]["seed"] = int(seed)
    return cfg


def check_train_configs(plan) -> None:
    """Build every distinct TrainConfig the plan will run (placeholder paths) so bad settings fail now."""
    from ..training.config import TrainConfig

    for task in plan.tasks:
        where = f"{plan.source}: training.stage1 (task {task})"
        _validate(TrainConfig, stage1_config(plan, task, 0, "BASE", "DATA", "RUN"), where)
        for variant, (entry, _) in plan.method_variants().items():
            cfg = stage2_config(plan, task, 0, variant, "BASE", "DATA", "RUN", "PROJECTOR")
            _validate(TrainConfig, cfg, f"{plan.source}: methods.{entry} ({variant}, task {task})")


def _validate(tc, cfg: dict, where: str) -> None:
    try:
        tc.from_dict(cfg, where="config")
    except FairllavaError as e:
        raise FairllavaError(f"{where}: {e}") from None


def regularised_layer(plan, task: str, n_hidden_states: int, hidden_size: int, variant: Optional[str] = None) -> int:
    """The hidden-state index the estimator regularises: the variant's own (fairllava) or the paper block's."""
    from ..regularizer import FairnessConfig, FairnessRegularizer

    fair = paper_fairness(plan.attribute)
    if variant is not None:
        entry, _ = plan.method_variants()[variant]
        if plan.methods[entry].method == "fairllava":
            fair = stage2_config(plan, task, 0, variant, "B", "D", "R", None)["fairness"]
    reg = FairnessRegularizer(FairnessConfig.from_dict(fair), hidden_size=hidden_size)
    return int(reg.layer_indices(n_hidden_states)[0])
